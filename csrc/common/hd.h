// NC_HD marks element math callable from both CPU loops and CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NC_HD __host__ __device__ __forceinline__
#else
#define NC_HD inline
#endif

// A pragma usable inside macro arguments (AT_DISPATCH_* lambdas), where #pragma is not allowed.
#define NC_PRAGMA(x) _Pragma(#x)
