"""l4vctl: inspect and drive L4-VIRTIO devices."""

__version__ = "0.1.0"
