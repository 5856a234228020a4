"""The ``relais`` command: the composition root that wires engine, gateway and local sinks."""
