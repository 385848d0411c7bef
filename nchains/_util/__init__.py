"""Private helpers shared by the sub-packages: hashing and atomic writes (:mod:`.io`), the
allocator setting of the scoring loops (:mod:`.memory`), dotted module paths (:mod:`.paths`),
the model's device and dtype (:mod:`.device`)."""
