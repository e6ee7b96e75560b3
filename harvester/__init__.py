"""harvester: when did this mailbox last log in, over which protocol, and from where?"""

__version__ = "0.1.0"
