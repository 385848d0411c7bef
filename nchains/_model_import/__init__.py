"""The pieces of :mod:`nchains.model_import` (``--model FILE``), one step of the import each.

- :mod:`.loading`: recognising a model file and loading it without running its code;
- :mod:`.convert_torchscript`: a TorchScript module as a ``torch.export`` program, with the
  module path of every op;
- :mod:`.aten_ops`: facts about the aten ops of a program (names, arguments, what is supported);
- :mod:`.layers`: aten ops that become standard layer modules (``nn.Conv2d``, ``nn.ReLU``, ...);
- :mod:`.torch_functions`: aten ops that become torch-level functions (``torch.cat``, ...);
- :mod:`.flat_graph`: pass 1 of the rebuild, the program as one flat fx graph;
- :mod:`.nesting`: pass 2 of the rebuild, that graph nested along the original module calls.
"""
