"""Where the built-in artifacts live."""

from lightning_rlhf.builtin import builtin_root


def test_an_empty_cache_variable_means_the_default_cache_not_the_current_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LIGHTNING_RLHF_CACHE", "")
    assert builtin_root().parent == tmp_path / ".cache" / "lightning_rlhf"
    monkeypatch.setenv("LIGHTNING_RLHF_CACHE", str(tmp_path / "mine"))
    assert builtin_root().parent == tmp_path / "mine"
