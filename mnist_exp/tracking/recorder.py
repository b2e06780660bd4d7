"""The recorder the runner and its callbacks write a run to: a tracker process's `RemoteRun`."""

from mnist_exp.tracking.remote import RemoteRun as Recorder

__all__ = ["Recorder"]
