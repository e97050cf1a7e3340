"""Running the cdcca protocol across many devices.

- ``local``:  every device and the cloud in one process (the demo and benchmarks).
- ``flower``: the same protocol as a Flower ServerApp (cloud) and ClientApp (device), over the network.
- ``certs``:  the CA, SuperLink certificate and per-device keys a deployment needs.
- ``deploy``: start, run and stop a SuperLink and N SuperNodes on one machine (``cdcca fleet up/run/down``).

Nothing is imported here, so ``import cdcca.fleet.flower`` in a Flower process stays light.
"""
