import pytest

from edgeprune.config import available, load_profile, load_target, shipped_dir
from edgeprune.errors import EdgepruneError

SHIPPED_TARGETS = sorted(p.stem for p in shipped_dir("targets").glob("*.toml"))
SHIPPED_PROFILES = sorted(p.stem for p in shipped_dir("profiles").glob("*.toml"))


def test_required_targets_are_shipped():
    assert {"arm16g", "demo"} <= set(SHIPPED_TARGETS)
    assert "default" in SHIPPED_PROFILES


@pytest.mark.parametrize("name", SHIPPED_TARGETS)
def test_shipped_target_validates(name):
    target = load_target(name)
    assert target.name == name
    assert target.slo.latency_budget_s is not None or target.slo.speedup is not None


@pytest.mark.parametrize("name", SHIPPED_PROFILES)
def test_shipped_profile_validates(name):
    profile = load_profile(name)
    assert profile.name == name
    assert profile.benchmark.repetitions >= 3


def test_arm16g_is_the_case_study():
    t = load_target("arm16g")
    assert (t.hardware.arch, t.hardware.ram_gib) == ("aarch64", 16)
    assert (t.slo.answer_tokens, t.slo.latency_budget_s) == (100, 2.0)


def test_demo_target_forces_pruning_by_speedup():
    t = load_target("demo")
    assert t.slo.speedup is not None and 1.2 <= t.slo.speedup <= 1.5


GOOD = """
description = "x"
[hardware]
arch = "aarch64"
cores = 4
ram_gib = 8
memory_bandwidth_gbs = 10
[slo]
prompt_tokens = 64
answer_tokens = 100
latency_budget_s = 2.0
[toolchain]
triple = "aarch64-linux-gnu"
cpu_flags = "armv8-a"
"""


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD.replace("cores = 4", "cores = 4\ncolor = 'red'"), "unknown key 'hardware.color'"),
        (GOOD.replace('cpu_flags = "armv8-a"', ""), "missing key 'toolchain.cpu_flags'"),
        (GOOD.replace("latency_budget_s = 2.0", ""), "needs latency_budget_s, speedup, or both"),
        (GOOD.replace("latency_budget_s = 2.0", "latency_budget_s = -1"), "'slo.latency_budget_s'"),
        (GOOD.replace('arch = "aarch64"', 'arch = "sparc"'), "'hardware.arch'"),
        (GOOD.replace("[slo]", "[slo"), "not valid TOML"),
        ('name = "x"\n' + GOOD, "remove the 'name' key"),
        (GOOD + '[runtime]\nallowed = ["llama.cpp", "llama.cpp"]\n', "a runtime is listed twice"),
        (GOOD + '[runtime]\nalowed = ["llama.cpp"]\n', "unknown key 'runtime.alowed'"),
    ],
)
def test_malformed_target_gives_one_clear_sentence(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(EdgepruneError) as err:
        load_target(str(path))
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_good_target_file_by_path(tmp_path):
    path = tmp_path / "ctrl.toml"
    path.write_text(GOOD)
    target = load_target(str(path))
    assert target.name == "ctrl" and target.device.url == "local"


def test_unknown_target_names_the_choices():
    with pytest.raises(EdgepruneError, match="choose one of .*arm16g"):
        load_target("no-such-target")


def test_user_target_directory_is_searched(tmp_path, monkeypatch):
    (tmp_path / "mybox.toml").write_text(GOOD)
    monkeypatch.setenv("EDGEPRUNE_TARGETS", str(tmp_path))
    assert "mybox" in available("targets")
    assert load_target("mybox").hardware.cores == 4


def test_budget_override_replaces_both_criteria():
    t = load_target("demo").with_budget(1.5, None)
    assert (t.slo.latency_budget_s, t.slo.speedup) == (1.5, None)
    with pytest.raises(EdgepruneError, match="Invalid budget override"):
        load_target("demo").with_budget(None, 0.5)


def test_a_build_searches_the_runtimes_that_can_ship_unless_told_which(tmp_path):
    from edgeprune.build import allowed_runtimes

    path = tmp_path / "ctrl.toml"
    path.write_text(GOOD)
    target = load_target(str(path))
    runtimes, excluded = allowed_runtimes(target)
    # ONNX Runtime is searched when asked for: left out of the default, and the report says why.
    assert [r.name for r in runtimes] == ["llama.cpp"] and "searched only when asked for" in excluded["onnxruntime"]
    path.write_text(GOOD + '[runtime]\nallowed = ["llama.cpp"]\n')
    only = load_target(str(path))
    assert allowed_runtimes(only)[1] == {"onnxruntime": "not allowed by target ctrl's [runtime] table"}
    # Asked for by name, it is searched, alone or beside llama.cpp.
    asked, left_out = allowed_runtimes(target, ("onnxruntime",))
    assert [r.name for r in asked] == ["onnxruntime"] and left_out == {"llama.cpp": "not allowed by --runtime"}
    assert allowed_runtimes(only, ("llama.cpp",))[1] == {"onnxruntime": "not allowed by --runtime"}
    # Names are checked against the runtime registry here, not in the schema: loading the registry loads
    # every runtime and device, which the code that stage keys hash must not import.
    # A runtime that cannot run the model's family is left out, or refused when asked for.
    assert [r.name for r in allowed_runtimes(target, family="qwen2")[0]] == ["llama.cpp"]
    assert allowed_runtimes(target, family="qwen2")[1] == {
        "onnxruntime": "edgeprune writes llama models for onnxruntime so far, not qwen2 models"}
    path.write_text(GOOD + '[runtime]\nallowed = ["llama.cpp", "onnxruntime"]\n')
    with pytest.raises(EdgepruneError, match=r"^onnxruntime cannot be searched for target ctrl: edgeprune writes "
                                             r"llama models for onnxruntime so far, not qwen2 models\.$"):
        allowed_runtimes(load_target(str(path)), family="qwen2")
    path.write_text(GOOD + '[runtime]\nallowed = ["tvm"]\n')
    with pytest.raises(EdgepruneError, match=r"^target ctrl's \[runtime\] table names the unknown runtime 'tvm': "
                                             r"edgeprune runs models with llama.cpp, onnxruntime\.$"):
        allowed_runtimes(load_target(str(path)))
