"""The pieces a :class:`~l4vctl.session.Session` is made of (internal).

* :mod:`.pageview`: the config page, single loads and stores of its fields;
* :mod:`.attachment`: the channel, attaching, IRQs and the memory lent to the device;
* :mod:`.negotiation`: status writes (IPC or cmd word) and feature negotiation;
* :mod:`.queues`: laying out, configuring and driving the queues.
"""
