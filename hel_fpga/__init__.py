"""hel-fpga: Hamiltonian Echo Learning on open FPGAs.

The package's subpackages are the repository's top-level folders, bottom to top:

* :mod:`hel_fpga.spec`   — the numeric format, the link protocol, frame codec and word
  packing: plain Python, the one definition every other layer imports;
* :mod:`hel_fpga.sim`    — the integer golden model, float references, the protocol model
  and the Verilator-simulated board;
* :mod:`hel_fpga.rtl`    — the gateware (Amaranth);
* :mod:`hel_fpga.boards` — the board table, clocks, bitstream builds and programming;
* :mod:`hel_fpga.host`   — the ``hel`` command line, device access and training.

docs/design.md describes the model and the architecture.
"""
