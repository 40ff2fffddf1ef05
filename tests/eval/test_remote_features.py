"""The probes read labelled shards behind a URL (a loopback HTTP server) exactly as local ones."""
from pathlib import Path

import torch

from simscale.eval.features import extract_features, load_encoder
from tests.data.loopback import LoopbackHTTP


def test_features_from_http_shards_equal_local(exported, digit_shards):
    _, path = exported
    train = Path(digit_shards[0])
    model = load_encoder(path)
    local = extract_features(model, str(train), batch_size=100)
    with LoopbackHTTP(train.parent) as http:
        http.fail_503 = 1  # the first request is refused once: retried
        remote = extract_features(model, f"{http.url}/{train.name}", batch_size=100)
        assert http.gets()  # really read over HTTP
    assert torch.equal(local[1], remote[1]) and torch.equal(local[0], remote[0])
