"""Snapshots of a module's state_dict, to check that a refused load left the module as it was."""

import torch


def snapshot(module):
    """A deep copy of ``module.state_dict()`` (tensors cloned, extra-state dicts copied)."""
    state = module.state_dict()
    return {k: v.clone() if isinstance(v, torch.Tensor) else dict(v) if isinstance(v, dict) else v
            for k, v in state.items()}


def assert_unchanged(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key
        else:
            assert after[key] == value, key
