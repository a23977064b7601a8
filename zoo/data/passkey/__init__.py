"""Passkey retrieval as a tfds builder: see ``zoo.data.passkey.builder``."""

from zoo.data.passkey.builder import Passkey, PasskeyConfig, make_task, passkey_example, passkey_layout

__all__ = ["Passkey", "PasskeyConfig", "make_task", "passkey_example", "passkey_layout"]
