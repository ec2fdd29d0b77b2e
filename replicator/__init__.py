"""replicator: keep a paused shadow of a running VM's RAM on a paired host, switch in one step."""

__version__ = "0.1.0"
