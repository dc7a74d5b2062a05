"""``lightning-shrink serve``: request checks, batching, backends and the CLI in-process, and the real
endpoint (the CLI in a subprocess on a free 127.0.0.1 port) answering HTTP requests."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_shrink as ls
from lightning_shrink.cli import main
from lightning_shrink.quantization import Int8Linear, prepare_qat
from lightning_shrink.serve import ModelInfo, Rejection, choose_backend, parse_request, read_model_info, serve
from lightning_shrink.serve.model_info import CAUSAL_LM, CLASSIFIER

ROOT = Path(__file__).resolve().parents[1]
LABELS = {0: "negative", 1: "positive"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lightning_shrink.demo.model import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    """A converted (int8) tiny BERT classifier with MiniLM's tokenizer, and a tiny Llama without one."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            id2label=LABELS,
            label2id={v: k for k, v in LABELS.items()},
        )
    ).eval()
    ls.export(bert, root / "classifier-fp32")
    tokenizer.save_pretrained(root / "classifier-fp32")
    fp32 = copy.deepcopy(bert)
    prepare_qat(bert)
    bert = ls.convert(bert)
    assert any(isinstance(m, Int8Linear) for m in bert.modules())
    ls.export(bert, root / "classifier")
    tokenizer.save_pretrained(root / "classifier")
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).eval()
    ls.export(llama, root / "lm")
    return {
        "classifier": root / "classifier",
        "classifier-fp32": root / "classifier-fp32",
        "lm": root / "lm",
        "bert": bert,
        "bert-fp32": fp32,
        "llama": llama,
    }


# Request checks.

INFO = ModelInfo(task=CAUSAL_LM, architecture="LlamaForCausalLM", vocab_size=64, max_positions=32)


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ([1, 2], "body", "JSON object"),
        ({}, "text", "exactly one of"),
        ({"input_ids": [[1]], "text": ["a"]}, "text", "exactly one of"),
        ({"input_ids": [[1]], "extra": 1}, "extra", "unknown field"),
        ({"input_ids": "1 2"}, "input_ids", "list of lists"),
        ({"input_ids": []}, "input_ids", "must not be empty"),
        ({"input_ids": [[]]}, "input_ids", "row 0 is empty"),
        ({"input_ids": [[1, 2.5]]}, "input_ids", "must hold ints"),
        ({"input_ids": [[1, True]]}, "input_ids", "must hold ints"),
        ({"input_ids": [[1, 2], [3]]}, "input_ids", "ragged"),
        ({"input_ids": [[1, 64]]}, "input_ids", "outside the vocabulary [0, 64)"),
        ({"input_ids": [[-1]]}, "input_ids", "outside the vocabulary"),
        ({"input_ids": [[1] * 30]}, "input_ids", "more than the model's 32 positions"),
        ({"input_ids": [[1, 2]], "attention_mask": [[1]]}, "attention_mask", "shape of `input_ids`"),
        ({"input_ids": [[1, 2]], "attention_mask": [[0, 0]]}, "attention_mask", "masks every token"),
        ({"input_ids": [[1, 2, 3]], "attention_mask": [[1, 0, 1]]}, "attention_mask", "one run of 1s"),
        ({"input_ids": [[1, 2]], "attention_mask": [[1, 2]]}, "attention_mask", "only 0 and 1"),
        ({"input_ids": [[1]], "max_new_tokens": 0}, "max_new_tokens", "[1, 31]"),
        ({"input_ids": [[1]], "max_new_tokens": "5"}, "max_new_tokens", "must be an int"),
        ({"text": ["a"]}, "text", "no tokenizer"),
    ],
)
def test_bad_request_is_a_rejection_naming_the_field(body, field, says):
    rejection = parse_request(body, INFO, tokenizer=None)
    assert isinstance(rejection, Rejection)
    assert rejection.field == field and rejection.status == 422
    assert says in rejection.detail


def test_text_requests_are_tokenized_and_checked(tokenizer):
    info = ModelInfo(task=CLASSIFIER, architecture="Bert", vocab_size=tokenizer.vocab_size, max_positions=8)
    examples = parse_request({"text": ["a fine film", "bad"]}, info, tokenizer)
    assert examples.sequences == tuple(tuple(ids) for ids in tokenizer(["a fine film", "bad"])["input_ids"])
    for body, says in [
        ({"text": "a fine film"}, "list of strings, got str"),
        ({"text": []}, "must not be empty"),
        ({"text": ["a", 3]}, "item 1 is int"),
        ({"text": ["a " * 20]}, "more than the model's 8 positions"),
        ({"text": ["a"], "attention_mask": [[1]]}, "goes with `input_ids`"),
        ({"text": ["a"], "max_new_tokens": 3}, "unknown field(s) `max_new_tokens`"),
    ]:
        rejection = parse_request(body, info, tokenizer)
        assert isinstance(rejection, Rejection) and says in rejection.detail, body
    # Padding given by the client (left or right) is removed: the sequence is what the mask marks.
    padded = parse_request(
        {"input_ids": [[0, 5, 6], [7, 0, 0]], "attention_mask": [[0, 1, 1], [1, 0, 0]]}, info, None
    )
    assert padded.sequences == ((5, 6), (7,))


def test_model_info_and_backend_choice(exports, tmp_path):
    info = read_model_info(exports["classifier"])
    assert (info.task, info.labels, info.max_positions) == (CLASSIFIER, ("negative", "positive"), 32)
    lm = read_model_info(exports["lm"])
    assert (lm.task, lm.vocab_size, lm.eos_token_ids, lm.pad_token_id) == (CAUSAL_LM, 64, (2,), 0)
    assert choose_backend(exports["classifier"]) == "torch"
    with pytest.raises(ValueError, match=r"`backend` is 'onnx' but .* has no model\.onnx"):
        choose_backend(exports["classifier"], "onnx")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        choose_backend(exports["classifier"], "tensorrt")
    (tmp_path / "model.onnx").write_bytes(b"")
    assert choose_backend(tmp_path) == "onnx" and choose_backend(tmp_path, "torch") == "torch"


# The LitAPI in-process: batching, padding, rejections that do not touch their batch.


@pytest.mark.parametrize(
    ("export", "tolerance"),
    # int8 layers quantize their input with one dynamic scale per batch tensor, so the padded rows
    # of other requests move an int8 answer by quantization noise; a float model answers exactly.
    [("classifier-fp32", 1e-6), ("classifier", 2e-3)],
)
def test_classifier_batch_answers_like_single_requests_and_the_model(exports, tokenizer, export, tolerance):
    from lightning_shrink.serve import ShrinkAPI

    model = exports["bert-fp32" if export.endswith("fp32") else "bert"]
    api = ShrinkAPI(exports[export], max_batch_size=4)
    api.setup("cpu")
    texts = ["a fine film", "a long, slow and rather tedious film about very little at all", "bad"]
    bodies = [{"text": texts[:2]}, {"text": ["x"], "extra": 1}, {"text": texts[2:]}]
    answers = api.unbatch(api.predict(api.batch([api.decode_request(b) for b in bodies])))
    bad = api.encode_response(answers[1])
    assert bad.status_code == 422 and json.loads(bad.body)["field"] == "extra"
    got = answers[0]["predictions"] + answers[2]["predictions"]
    with torch.no_grad():
        for text, prediction in zip(texts, got, strict=True):
            single = api.predict(api.decode_request({"text": [text]}))["predictions"][0]
            logits = model(**tokenizer([text], return_tensors="pt")).logits[0]
            expected = torch.softmax(logits.double(), -1)
            for i, label in LABELS.items():
                # Alone, a request is answered as the model answers it; in a batch, within `tolerance`.
                assert single["probabilities"][label] == pytest.approx(float(expected[i]), abs=1e-6)
                assert prediction["probabilities"][label] == pytest.approx(float(expected[i]), abs=tolerance)


def test_causal_lm_batch_generates_like_the_model_alone(exports):
    from lightning_shrink.serve import ShrinkAPI

    api = ShrinkAPI(exports["lm"], max_batch_size=4)
    api.setup("cpu")
    bodies = [
        {"input_ids": [[5, 6, 7, 8, 9], [0, 0, 0, 10, 11]], "attention_mask": [[1] * 5, [0, 0, 0, 1, 1]]},
        {"input_ids": [[10, 11]], "max_new_tokens": 3},
        {"input_ids": [[1, 2]], "max_new_tokens": 40},
    ]
    answers = api.predict([api.decode_request(b) for b in bodies])
    assert isinstance(answers[2], Rejection) and answers[2].field == "max_new_tokens"
    got = [g["token_ids"] for g in answers[0]["generations"] + answers[1]["generations"]]
    for prompt, limit, ids in zip([[5, 6, 7, 8, 9], [10, 11], [10, 11]], [16, 16, 3], got, strict=True):
        with torch.no_grad():
            alone = (
                exports["llama"]
                .generate(
                    input_ids=torch.tensor([prompt]), max_new_tokens=limit, do_sample=False, pad_token_id=0
                )[0, len(prompt) :]
                .tolist()
            )
        assert ids == alone


def _onnx_export(directory: Path, config, logits_of_ids) -> None:
    """A small ONNX graph (logits from an embedding table) beside a transformers config.json."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table, reduce = logits_of_ids
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["per_token"])]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    if reduce:  # a classifier: the masked sum over the sequence
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask3"]),
            helper.make_node("Mul", ["per_token", "mask3"], ["masked"]),
            helper.make_node("ReduceSum", ["masked", "axis1"], ["logits"], keepdims=0),
        ]
        out_shape = ["batch", table.shape[1]]
    else:
        nodes += [helper.make_node("Identity", ["per_token"], ["logits"])]
        out_shape = ["batch", "sequence", table.shape[1]]
    graph = helper.make_graph(
        nodes,
        "tiny",
        inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)],
        initializer=[
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    directory.mkdir()
    onnx.save(model, directory / "model.onnx")
    config.save_pretrained(directory)


def test_onnx_backend_classifies_and_generates(tmp_path):
    from transformers import BertConfig, LlamaConfig

    from lightning_shrink.serve import ShrinkAPI

    rng = np.random.default_rng(0)
    table = rng.standard_normal((16, 2)).astype(np.float32)
    config = BertConfig(
        vocab_size=16,
        max_position_embeddings=8,
        id2label=LABELS,
        architectures=["BertForSequenceClassification"],
    )
    _onnx_export(tmp_path / "clf", config, (table, True))
    api = ShrinkAPI(tmp_path / "clf")
    assert api.backend_name == "onnx"
    api.setup("cpu")
    answers = api.predict(
        [api.decode_request({"input_ids": [[3, 4, 5]]}), api.decode_request({"input_ids": [[7]]})]
    )
    for ids, answer in zip([[3, 4, 5], [7]], answers, strict=True):
        logits = table[ids].sum(0).astype(np.float64)
        expected = np.exp(logits) / np.exp(logits).sum()
        assert answer["predictions"][0]["probabilities"]["positive"] == pytest.approx(expected[1], abs=1e-6)

    successor = np.full((16, 16), -1.0, dtype=np.float32)
    successor[np.arange(16), (np.arange(16) + 3) % 16] = 1.0  # token t -> t + 3
    lm = LlamaConfig(
        vocab_size=16, max_position_embeddings=32, eos_token_id=15, architectures=["LlamaForCausalLM"]
    )
    _onnx_export(tmp_path / "lm", lm, (successor, False))
    api = ShrinkAPI(tmp_path / "lm")
    api.setup("cpu")
    answers = api.predict(
        [
            api.decode_request({"input_ids": [[1, 2]], "max_new_tokens": 4}),
            api.decode_request({"input_ids": [[5]]}),
        ]
    )
    assert answers[0]["generations"][0]["token_ids"] == [5, 8, 11, 14]
    # From 5: 8, 11, 14, 1, ..., 12, then 15, the end-of-sequence token, ends it before 16 tokens.
    assert answers[1]["generations"][0]["token_ids"] == [8, 11, 14, 1, 4, 7, 10, 13, 0, 3, 6, 9, 12, 15]


# Arguments, checked before anything starts.


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--port", "80"], "`--port` must be an int in [1024, 65535], got 80"),
        (["--port", "70000"], "`--port`"),
        (["--workers", "0"], "`--workers` must be an int in [1, inf)"),
        (["--max-batch-size", "0"], "`--max-batch-size`"),
        (["--batch-timeout", "-1"], "`--batch-timeout`"),
        (["--host", "localhost"], "`--host` must be one of ['127.0.0.1', '0.0.0.0', '::']"),
        (["--backend", "tensorrt"], "`--backend` must be one of ['auto', 'torch', 'onnx']"),
        (["--backend", "onnx"], "has no model.onnx"),
    ],
)
def test_serve_command_refuses_bad_arguments_with_status_2(exports, options, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(exports["classifier"]), *options])
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err


def test_serve_command_refuses_a_directory_that_is_not_an_export(tmp_path, capsys):
    for directory, says in [
        (tmp_path / "missing", "`DIRECTORY` '" + str(tmp_path / "missing") + "' does not exist"),
        (tmp_path, "is not a lightning-shrink export"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", str(directory)])
        assert exit_info.value.code == 2 and says in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "vocab_size": 8}))
    with pytest.raises(SystemExit):
        main(["serve", str(tmp_path)])
    assert "the endpoint serves sequence classifiers" in capsys.readouterr().err


def test_serve_without_litserve_names_the_extra(exports, monkeypatch):
    monkeypatch.setitem(sys.modules, "litserve", None)  # `import litserve` raises ImportError
    with pytest.raises(ImportError, match=r'pip install "lightning-shrink\[serve\]"'):
        serve(exports["classifier"], port=8123)


# The real endpoint: the CLI in a subprocess, HTTP on 127.0.0.1.

STARTUP_LIMIT_S = 300  # two servers starting at once on a loaded 2-core machine
REQUEST_LIMIT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: object, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_LIMIT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _wait_healthy(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT_S
    for _ in range(STARTUP_LIMIT_S * 2):
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    pytest.fail(f"the server was not healthy within {STARTUP_LIMIT_S} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):  # whatever of its group is left (LitServe's workers)
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(exports, tmp_path_factory):
    """``lightning-shrink serve`` on the classifier and on the LM, started together, always stopped."""
    logs = tmp_path_factory.mktemp("serve-logs")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    started = {}
    try:
        for name in ("classifier", "lm"):
            port = _free_port()
            log = logs / f"{name}.log"
            command = [
                sys.executable,
                "-m",
                "lightning_shrink.cli",
                "serve",
                str(exports[name]),
                "--port",
                str(port),
            ]
            with log.open("w") as out:
                process = subprocess.Popen(
                    command, cwd=logs, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            started[name] = (process, port, log)
        for process, port, log in started.values():
            _wait_healthy(process, port, log)
        yield {name: port for name, (_, port, _) in started.items()}
    finally:
        for process, _, _ in started.values():
            _stop(process)


@pytest.mark.slow
def test_endpoint_answers_rejects_and_keeps_serving(servers, exports, tokenizer):
    port = servers["classifier"]
    status, answer = _post(port, {"text": ["a fine film"]})
    assert status == 200
    with torch.no_grad():
        logits = exports["bert"](**tokenizer(["a fine film"], return_tensors="pt")).logits[0]
    expected = torch.softmax(logits.double(), -1)
    first = answer["predictions"][0]
    assert first["label"] == LABELS[int(expected.argmax())]
    assert first["probabilities"]["positive"] == pytest.approx(float(expected[1]), abs=1e-5)
    ids = tokenizer(["a fine film"])["input_ids"]
    status, by_ids = _post(port, {"input_ids": ids, "attention_mask": [[1] * len(ids[0])]})
    assert status == 200 and by_ids["predictions"][0]["probabilities"] == pytest.approx(
        first["probabilities"]
    )

    for body, field in [
        ({"input_ids": [[1, 2], [3]]}, "input_ids"),
        ({"text": ["ok"], "labels": [1]}, "labels"),
        ({"input_ids": [[101, 10**6]]}, "input_ids"),
        ({"text": "not a list"}, "text"),
    ]:
        status, rejection = _post(port, body)
        assert 400 <= status < 500 and rejection["field"] == field and f"`{field}`" in rejection["detail"]
    status, rejection = _post(port, None, raw=b'{"text": [')
    assert status == 422 and "JSON" in json.dumps(rejection)
    status, again = _post(port, {"text": ["a fine film", "a long and tedious film"]})
    assert status == 200  # still serving
    assert again["predictions"][0]["probabilities"] == pytest.approx(first["probabilities"], abs=2e-3)


@pytest.mark.slow
def test_endpoint_generates_with_a_causal_lm(servers, exports):
    port = servers["lm"]
    prompt = [5, 6, 7]
    status, answer = _post(port, {"input_ids": [prompt], "max_new_tokens": 4})
    assert status == 200
    with torch.no_grad():
        expected = exports["llama"].generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=0
        )[0, len(prompt) :]
    assert answer["generations"][0]["token_ids"] == expected.tolist()
    status, rejection = _post(port, {"input_ids": [prompt], "max_new_tokens": 100})
    assert status == 422 and rejection["field"] == "max_new_tokens"
    status, rejection = _post(port, {"text": ["hello"]})
    assert status == 422 and "no tokenizer" in rejection["detail"]
