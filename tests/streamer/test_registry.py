import numpy as np
import pytest

from factors.artifacts import ModelArtifact
from streamer.errors import RegistryError
from streamer.registry import ModelRegistry


def artifact(seed: int) -> ModelArtifact:
    rng = np.random.default_rng(seed)
    return ModelArtifact(item_factors=rng.random((3, 2), dtype=np.float32),
                         user_factors=rng.random((2, 2), dtype=np.float32),
                         item_ids=["a", "b", "c"], user_ids=["u", "v"], params={"factors": 2})


def test_add_promote_rollback(tmp_path):
    reg = ModelRegistry(tmp_path / "models")
    assert reg.versions() == [] and reg.active_version() is None
    with pytest.raises(RegistryError, match="no active model"):
        reg.load()
    v1, v2, v3 = reg.add(artifact(1)), reg.add(artifact(2)), reg.add(artifact(3))
    assert (v1, v2, v3) == ("v000001", "v000002", "v000003")
    assert reg.active_version() is None  # adding does not activate
    reg.promote(v1)
    reg.promote(v2)
    reg.promote(v3)
    assert reg.load().version == v3
    assert np.array_equal(reg.load(v1).artifact.item_factors, artifact(1).item_factors)
    assert reg.rollback() == v2
    assert reg.active_version() == v2
    assert reg.rollback() == v1
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()
    assert [h["action"] for h in reg.history()] == ["promote"] * 3 + ["rollback"] * 2


def test_unknown_versions_are_clear_errors(tmp_path):
    reg = ModelRegistry(tmp_path)
    reg.add(artifact(1))
    with pytest.raises(RegistryError, match="v000009 not found"):
        reg.promote("v000009")
    with pytest.raises(RegistryError, match="must look like v000001"):
        reg.path("latest")
