"""Config: YAML + overrides, and bad configs rejected with messages that name the fix."""

import pytest

from pipeline_config import ConfigError, PipelineConfig, load_config, preflight


@pytest.mark.parametrize("name", ["demo", "gpt2_squad_qlora", "memorize"])
def test_bundled_configs_load(name):
    config = load_config(name)
    assert isinstance(config, PipelineConfig)


def test_seed_recipe_values():
    c = load_config("gpt2_squad_qlora")
    assert c.model.name_or_path == "openai-community/gpt2"
    assert c.data.hub_dataset == "rajpurkar/squad"
    assert (c.lora.lora_r, c.lora.lora_alpha, c.lora.lora_dropout, c.lora.bias) == (
        32, 32, 0.05, "none"
    )
    assert c.lora.target_modules == ["attn.c_attn", "attn.c_proj"]
    assert c.quantization.load_in_4bit and c.quantization.bnb_4bit_quant_type == "nf4"
    assert c.quantization.bnb_4bit_compute_dtype == "float16"
    assert not c.quantization.bnb_4bit_use_double_quant
    t = c.training
    assert (t.learning_rate, t.per_device_train_batch_size, t.max_steps) == (2e-4, 16, 10_000)
    assert (t.save_steps, t.eval_steps, t.optim) == (1000, 1000, "paged_adamw_8bit")
    assert t.gradient_accumulation_steps == 2 and t.fp16
    assert t.gradient_checkpointing


def test_overrides_are_typed_and_nested():
    c = load_config("demo", ["training.max_steps=7", "lora.target_modules=[attn.c_attn]",
                             "training.learning_rate=1e-4", "data.max_train_samples=null"])
    assert c.training.max_steps == 7
    assert c.lora.target_modules == ["attn.c_attn"]
    assert c.training.learning_rate == pytest.approx(1e-4)
    assert c.data.max_train_samples is None


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["training.max_step=3"])
    msg = str(err.value)
    assert "training.max_step: unknown key" in msg
    assert "Did you mean 'max_steps'" in msg


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["training.max_steps=abc"])
    assert "training.max_steps" in str(err.value)
    assert "'abc'" in str(err.value)


@pytest.mark.parametrize(
    "overrides, fix",
    [
        (["quantization.load_in_8bit=true"], "pick one"),
        (["data.hub_dataset=rajpurkar/squad"], "set data.hub_dataset=null"),
        (["data.max_seq_len=1024"], "lower data.max_seq_len"),
        (["model.random_init.n_embd=250"], "divisible by n_head"),
        (["training.fail_after_step=3"], "multiple of training.save_steps"),
    ],
)
def test_bad_combinations_say_what_to_change(overrides, fix):
    with pytest.raises(ConfigError) as err:
        load_config("demo", overrides)
    assert fix in str(err.value)


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config("demo", ["training.max_steps"])
    with pytest.raises(ConfigError, match="not found; bundled configs: demo"):
        load_config("no_such_config")


def test_fingerprint_ignores_fault_injection_but_not_learning_rate():
    base = load_config("demo")
    assert load_config("demo", ["training.fail_after_step=20"]).fingerprint() == base.fingerprint()
    assert load_config("demo", ["training.learning_rate=0.5"]).fingerprint() != base.fingerprint()


def test_preflight_names_missing_local_inputs(tmp_path):
    config = load_config("demo", [f"data.train_files=[{tmp_path}/missing.json]"])
    with pytest.raises(ConfigError) as err:
        preflight(config)
    assert "data.train_files[0]" in str(err.value) and "missing.json" in str(err.value)


@pytest.mark.parametrize("kind", ["empty directory", "unreadable"])
def test_preflight_refuses_an_empty_directory_or_unreadable_data_file_in_one_line(tmp_path,
                                                                                  kind):
    import os

    target = tmp_path / "data.json"
    if kind == "empty directory":
        target.mkdir()
    else:
        target.write_text("{}")
        target.chmod(0)
        if os.access(target, os.R_OK):
            pytest.skip("this user reads any file (root)")
    config = load_config("demo", [f"data.train_files=[{target}]"])
    with pytest.raises(ConfigError) as err:
        preflight(config)
    message = str(err.value)
    assert "\n" not in message and "data.train_files" in message
    if kind == "empty directory":  # a watched folder: what to do in it, not a CLI override
        assert "holds no data files" in message and "add one" in message
        assert "/path/to/" not in message
    else:
        assert "not readable" in message and "'data.train_files=[/path/to/" in message


def test_preflight_refuses_the_hub_without_network_or_cache_fast(monkeypatch):
    """The recipe on a machine without the hub: refused at once, naming the local overrides."""
    import time

    # conftest points HF_HOME at an empty folder: nothing is cached.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as a machine without network is configured
    config = load_config("gpt2_squad_qlora", [
        "training.fp16=false", "training.optim=adamw_8bit",
    ])
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        preflight(config)
    assert time.perf_counter() - started < 2
    message = str(err.value)
    assert "data.hub_dataset=rajpurkar/squad" in message and "not reachable" in message
    assert "model.name_or_path=openai-community/gpt2" in message
    assert "data.hub_dataset=null" in message and "'data.train_files=[" in message


# Issue 14, item 6: everything config can check is checked before any stage or server starts,
# through the real `squadtune run` entry point: one line on stderr, exit status 2, no traceback.


def run_refused(capsys, *overrides, config="demo") -> str:
    from flows.cli import main

    code = main(["run", "--config", config, *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("override, named", [
    ("training.max_steps=true", "training.max_steps: Input should be a valid integer (got True)"),
    ("training.max_steps=2.5", "training.max_steps: Input should be a valid integer (got 2.5)"),
    ("quantization.load_in_4bit=1", "quantization.load_in_4bit: Input should be a valid boolean"),
    ("training.learning_rate=fast", "training.learning_rate: Input should be a valid number"),
])
def test_strict_types_refuse_what_lax_parsing_would_coerce(capsys, override, named):
    assert named in run_refused(capsys, override)


def test_exponent_floats_still_read_as_numbers():
    # YAML 1.1 reads `1e-3` as a string; strict types would then refuse a common spelling.
    assert load_config("demo", ["training.learning_rate=1e-3"]).training.learning_rate == 1e-3


def test_a_yaml_key_given_twice_is_refused_naming_both_lines(tmp_path, capsys):
    (tmp_path / "twice.yaml").write_text(
        "training:\n  max_steps: 5\nmodel:\n  name_or_path: x\ntraining:\n  save_steps: 2\n"
    )
    err = run_refused(capsys, config=str(tmp_path / "twice.yaml"))
    assert "key 'training' is given twice (lines 1 and 5)" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("override, problem, fix", [
    ("lora.target_modules=[attn.q_proj]", "['attn.q_proj'] match no module of the base model",
     "'lora.target_modules=[attn.c_attn]'"),
    ("lora.target_modules=[attn.c_attn, ln_1]", "'ln_1' matches a LayerNorm",
     "'lora.target_modules=[attn.c_attn]'"),
    ("training.optim=foo", "training.optim=foo is not a transformers name",
     "training.optim=adamw_torch"),
    ("training.optim=adamw_torhc", "training.optim=adamw_torhc", "training.optim=adamw_torch"),
    ("registry.model_name=team/qa", "registry.model_name='team/qa' is refused by MLflow",
     "registry.model_name=squadtune-model"),
    ("registry.alias=latest", "'latest' alias name (case insensitive) is reserved",
     "registry.alias=candidate"),
])
def test_preflight_refuses_what_would_fail_after_training(capsys, override, problem, fix):
    err = run_refused(capsys, override)
    assert len(err.strip().splitlines()) == 1, err
    assert problem in err and f"Fix with the overrides: {fix}" in err


def test_preflight_reads_the_data_before_anything_starts(tmp_path, capsys, squad_doc):
    from tests.conftest import write_squad

    # v2.0 data (unanswerable questions) in a file that says 1.1: the fix is squad_v2, not
    # a looser bad-record threshold.
    paragraph = dict(squad_doc["data"][0]["paragraphs"][0])
    paragraph["qas"] = [{**q, "answers": []} for q in paragraph["qas"]]
    v2 = write_squad(tmp_path / "v2.json", [{"title": "T", "paragraphs": [paragraph]}])
    err = run_refused(capsys, f"data.train_files=[{v2}]")
    assert "To go on, set data.squad_v2=true" in err and "data.squad_v2=true" in err
    # A directory is the data files in it; one holding none is refused, not read as no data.
    (tmp_path / "empty").mkdir()
    err = run_refused(capsys, f"data.train_files=[{tmp_path / 'empty'}]")
    assert "the directory" in err and "holds no data files" in err
    err = run_refused(capsys, f"data.train_files=[{tmp_path}]")  # v2.json is in it
    assert "To go on, set data.squad_v2=true" in err


def test_preflight_refuses_an_eval_set_that_overlaps_training_unless_allowed(
    small_squad_file, capsys
):
    same = [f"data.train_files=[{small_squad_file}]", f"data.eval_files=[{small_squad_file}]"]
    err = run_refused(capsys, *same)
    assert "held-out questions (100.0%) are also training questions" in err
    assert "data.eval_overlap=allow" in err
    preflight(load_config("demo", [*same, "data.eval_overlap=allow"]))  # intended: allowed
    assert load_config("memorize").data.eval_overlap == "allow"
