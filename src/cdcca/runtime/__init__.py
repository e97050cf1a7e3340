"""The device and cloud runtimes, the stores they own, the device HTTP API and the round protocol."""
