"""Where a measurement happens. One registry: a device URL's scheme picks the class."""

from edgeprune.devices import local, qemu, ssh  # noqa: F401  (register "local", "qemu-aarch64", "ssh")
from edgeprune.devices.base import Device, DeviceError, DeviceUnreachable, get_device, host_arch, normalize_arch

__all__ = ["Device", "DeviceError", "DeviceUnreachable", "get_device", "host_arch", "normalize_arch"]
