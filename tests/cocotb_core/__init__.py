"""cocotb testbench of the HEL core and the scenarios it shares with the Amaranth-sim test."""
