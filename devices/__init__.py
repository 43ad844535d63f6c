"""hilq devices: the on-device agent, runtimes, power meters, local and SSH targets."""
