"""Training from the host (``hel train``).

Modules
-------
tasks       the data sets (oscillators, sine, digits, user ``.npz``) and their losses
floatpath   batched float64 forward, BPTT and RHEL driven by any output gradient
engines     how a batch's gradient is obtained: float BPTT, float RHEL, HEL on a device
optim       Adam on float master weights, initialisation, learning-rate schedule
checkpoint  atomic checkpoints (master weights, optimiser state, epoch, RNG state, config)
progress    tqdm bars per epoch
plots       loss curves, forward-vs-echo trajectories, gradient agreement (PNG)
loop        the training loop tying them together
"""
