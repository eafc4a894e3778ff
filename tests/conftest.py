"""Shared test set-up: offline, quiet, deterministic, and unable to reach anything but this machine."""

import ipaddress
import json
import os
import socket

import pytest

# Set before anything imports transformers, albumentations or google-auth: no hub, no update checks, and no
# probe of the cloud metadata server (google-auth pings 169.254.169.254 when it looks for credentials).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ["NO_GCE_CHECK"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _loopback_only(sock: socket.socket, address) -> None:
    """Tests talk to servers they start on 127.0.0.1; any other destination is a bug in a test or the code."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    host = address[0]
    for info in socket.getaddrinfo(host, None):
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        if not (ip.is_loopback or (mapped is not None and mapped.is_loopback)):
            raise ConnectionRefusedError(f"tests may only connect to loopback, not {host}")


def _guarded_connect(self, address):
    _loopback_only(self, address)
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    _loopback_only(self, address)
    return _connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random open_clip saved as our filter loads trained models: ``tiny.pt`` plus ``<name>.json``."""
    import torch

    from visinstruct.testing.tiny_models import TINY_OPEN_CLIP_CONFIG, TINY_OPEN_CLIP_NAME, tiny_open_clip

    folder = tmp_path_factory.mktemp("tiny-clip")
    model, _, _ = tiny_open_clip(seed=7)
    torch.save(model.state_dict(), folder / "tiny.pt")
    (folder / f"{TINY_OPEN_CLIP_NAME}.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    return folder
