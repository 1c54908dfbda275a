"""Emulated L4-VIRTIO devices: a device model behind the device side of the protocol, served on a Unix socket."""
