"""Channels: one adapter per way of reaching a person, found by name through the ``relais.channels``
entry points. The public surface is the interface in ``channels.base``, the errors and the registry."""
