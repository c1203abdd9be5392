"""Malformed adapters are refused with a typed error, and nothing reaches S3 or Postgres."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from storage import errors, repo
from storage.adapter_format import (
    UploadFiles,
    blob_sha256,
    canonical_blob,
    load_canonical,
    narrowed_blob,
    read_upload,
    validate,
)
from storage.backbone import default_backbone_spec
from storage.registry import Registry
from storage.settings import RegistrySettings

SPEC = default_backbone_spec()
SHAPES = SPEC.module_shapes()
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def key(layer: int, module: str, ab: str, parent: str | None = None) -> str:
    return f"base_model.model.model.layers.{layer}.{parent or PARENT[module]}.{module}.lora_{ab}.weight"


def lora_tensors(
    modules: tuple[str, ...] = ("q_proj", "v_proj"), layers: tuple[int, ...] = (0, 1), r: int = 8
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in layers:
        for m in modules:
            in_f, out_f = SHAPES[m]
            out[key(layer, m, "A")] = torch.randn(r, in_f, generator=g) * 0.02
            out[key(layer, m, "B")] = torch.randn(out_f, r, generator=g) * 0.02
    return out


def config(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "bias": "none",
        "fan_in_fan_out": False, "use_dora": False, "use_rslora": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "task_type": "CAUSAL_LM",
    }
    base.update(overrides)
    return base


def files(cfg: dict[str, object] | bytes | None = None, tensors: dict[str, torch.Tensor] | bytes | None = None,
          ) -> dict[str, bytes]:
    c = cfg if isinstance(cfg, bytes) else json.dumps(cfg if cfg is not None else config()).encode()
    t = tensors if isinstance(tensors, bytes) else save_safetensors(tensors if tensors is not None else lora_tensors())
    return {"adapter_config.json": c, "adapter_model.safetensors": t}


def tar_gz(members: dict[str, bytes], *, symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def with_value(name: str, value: float) -> dict[str, torch.Tensor]:
    t = lora_tensors()
    t[name][0, 0] = value
    return t


def replaced(old: str, new: str, tensor: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    t = lora_tensors()
    moved = t.pop(old)
    t[new] = moved if tensor is None else tensor
    return t


def header_only(header: bytes, declared: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header


def valid_weights_truncated() -> bytes:
    blob = save_safetensors(lora_tensors())
    return blob[: len(blob) // 2]


def int_tensor_weights() -> bytes:
    t = lora_tensors()
    t[key(0, "q_proj", "A")] = torch.zeros(8, 576, dtype=torch.int32)
    return save_safetensors(t)


def directory(tmp: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        (tmp / name).write_bytes(data)
    return tmp


# (case id, how to build the upload from a tmp dir, expected error type)
Source = Callable[[Path], Path | bytes]
CASES: list[tuple[str, Source, type[errors.AdapterInvalid]]] = [
    ("pickle-bin", lambda d: directory(d, {"adapter_config.json": files()["adapter_config.json"],
                                           "adapter_model.bin": b"\x80\x04K\x01."}), errors.PickleRefused),
    ("pickle-in-archive", lambda d: tar_gz({**files(), "adapter_model.bin": b"\x80\x04."}), errors.PickleRefused),
    ("missing-weights", lambda d: tar_gz({"adapter_config.json": files()["adapter_config.json"]}),
     errors.MissingFile),
    ("missing-config", lambda d: tar_gz({"adapter_model.safetensors": files()["adapter_model.safetensors"]}),
     errors.MissingFile),
    ("unexpected-file", lambda d: tar_gz({**files(), "run.sh": b"rm -rf /"}), errors.UnexpectedFile),
    ("config-not-json", lambda d: tar_gz(files(b"{not json")), errors.ConfigInvalid),
    ("config-not-object", lambda d: tar_gz(files(b"[1, 2]")), errors.ConfigInvalid),
    ("config-r-not-int", lambda d: tar_gz(files(config(r="eight"))), errors.ConfigInvalid),
    ("dora", lambda d: tar_gz(files(config(use_dora=True))), errors.UnsupportedFeature),
    ("modules-to-save", lambda d: tar_gz(files(config(modules_to_save=["lm_head"]))), errors.UnsupportedFeature),
    ("fan-in-fan-out", lambda d: tar_gz(files(config(fan_in_fan_out=True))), errors.UnsupportedFeature),
    ("bias-trained", lambda d: tar_gz(files(config(bias="lora_only"))), errors.UnsupportedFeature),
    ("embedding-target", lambda d: tar_gz(files(config(target_modules=["embed_tokens", "q_proj"]))),
     errors.UnsupportedFeature),
    ("embedding-tensor", lambda d: tar_gz(files(tensors={
        **lora_tensors(), "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 49152)})),
     errors.UnsupportedFeature),
    ("truncated-weights", lambda d: tar_gz(files(tensors=valid_weights_truncated())), errors.SafetensorsInvalid),
    ("weights-too-short", lambda d: tar_gz(files(tensors=b"\x01\x02")), errors.SafetensorsInvalid),
    ("oversized-header", lambda d: tar_gz(files(tensors=header_only(b"{}", declared=1 << 40))),
     errors.HeaderTooLarge),
    ("header-not-json", lambda d: tar_gz(files(tensors=header_only(b"{nope"))), errors.SafetensorsInvalid),
    ("offsets-out-of-file", lambda d: tar_gz(files(tensors=header_only(json.dumps({
        key(0, "q_proj", "A"): {"dtype": "F32", "shape": [8, 576], "data_offsets": [0, 18432]}}).encode()))),
     errors.SafetensorsInvalid),
    ("int-dtype", lambda d: tar_gz(files(tensors=int_tensor_weights())), errors.UnsupportedDtype),
    ("nan", lambda d: tar_gz(files(tensors=with_value(key(1, "v_proj", "A"), float("nan")))),
     errors.NonFiniteValues),
    ("inf", lambda d: tar_gz(files(tensors=with_value(key(0, "q_proj", "B"), float("inf")))),
     errors.NonFiniteValues),
    ("a-wrong-in-width", lambda d: tar_gz(files(tensors=replaced(key(0, "q_proj", "A"), key(0, "q_proj", "A"),
                                                                 torch.zeros(8, 575)))), errors.ShapeMismatch),
    ("b-wrong-out-width", lambda d: tar_gz(files(tensors=replaced(key(0, "q_proj", "B"), key(0, "q_proj", "B"),
                                                                  torch.zeros(100, 8)))), errors.ShapeMismatch),
    ("k-proj-gqa-width", lambda d: tar_gz(files(config(target_modules=["k_proj"]), {
        key(0, "k_proj", "A"): torch.zeros(8, 576), key(0, "k_proj", "B"): torch.zeros(576, 8)})),
     errors.ShapeMismatch),
    ("rank-mismatch-a-b", lambda d: tar_gz(files(tensors=replaced(key(0, "q_proj", "B"), key(0, "q_proj", "B"),
                                                                  torch.zeros(576, 4)))), errors.ShapeMismatch),
    ("three-d-tensor", lambda d: tar_gz(files(tensors=replaced(key(0, "q_proj", "A"), key(0, "q_proj", "A"),
                                                               torch.zeros(8, 576, 1)))), errors.ShapeMismatch),
    ("layer-out-of-range", lambda d: tar_gz(files(tensors=lora_tensors(layers=(0, 30)))), errors.LayerOutOfRange),
    ("rank-zero", lambda d: tar_gz(files(config(r=0), lora_tensors(r=0))), errors.InvalidRank),
    ("rank-above-max", lambda d: tar_gz(files(config(r=129), lora_tensors(modules=("v_proj",), layers=(0,), r=129))),
     errors.InvalidRank),
    ("rank-differs-from-config", lambda d: tar_gz(files(config(r=16))), errors.InvalidRank),
    ("rank-pattern-differs", lambda d: tar_gz(files(config(rank_pattern={"layers.1.self_attn.v_proj": 4}))),
     errors.InvalidRank),
    ("unknown-module", lambda d: tar_gz(files(tensors=replaced(key(0, "q_proj", "A"),
                                                               key(0, "rotary_emb", "A", "self_attn")))),
     errors.UnsupportedModule),
    ("module-wrong-parent", lambda d: tar_gz(files(tensors=replaced(key(0, "q_proj", "A"),
                                                                    key(0, "q_proj", "A", "mlp")))),
     errors.UnsupportedModule),
    ("unknown-key", lambda d: tar_gz(files(tensors={**lora_tensors(), "some.random.weight": torch.zeros(2)})),
     errors.UnknownTensorKey),
    ("missing-b", lambda d: tar_gz(files(tensors={k: v for k, v in lora_tensors().items()
                                                  if k != key(1, "q_proj", "B")})), errors.MissingLoraPair),
    ("no-lora-tensors", lambda d: tar_gz(files(tensors={})), errors.EmptyAdapter),
    ("empty-tar", lambda d: tar_gz({}), errors.EmptyArchive),
    ("empty-zip", lambda d: zip_bytes({}), errors.EmptyArchive),
    ("tar-path-traversal", lambda d: tar_gz({"../../adapter_config.json": b"{}", **files()}),
     errors.UnsafeArchiveMember),
    ("tar-absolute-path", lambda d: tar_gz({"/etc/adapter_config.json": b"{}"}), errors.UnsafeArchiveMember),
    ("tar-symlink", lambda d: tar_gz(files(), symlink="link"), errors.UnsafeArchiveMember),
    ("zip-path-traversal", lambda d: zip_bytes({"x/../../adapter_model.safetensors": b"", **files()}),
     errors.UnsafeArchiveMember),
    ("not-an-archive", lambda d: b"GIF89a this is not an adapter", errors.ArchiveInvalid),
    ("corrupt-gzip", lambda d: b"\x1f\x8b\x08\x00garbage", errors.ArchiveInvalid),
    ("upload-too-large", lambda d: tar_gz(files()) + b"\0" * (3 << 20), errors.UploadTooLarge),
]


def test_enough_cases() -> None:
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("case", "source", "error"), CASES, ids=[c[0] for c in CASES])
async def test_malformed_adapter_is_refused_and_nothing_is_written(
    case: str, source: Source, error: type[errors.AdapterInvalid], tmp_path: Path, sessions, store
) -> None:
    registry = Registry(sessions=sessions, store=store, spec=SPEC,
                        settings=RegistrySettings(max_upload_bytes=2 << 20))
    with pytest.raises(error) as info:
        await registry.push(tenant="acme", name="bad", source=source(tmp_path))
    assert info.value.code == error.code
    assert str(info.value)  # the message names what is wrong
    assert store.list_blobs() == []
    async with sessions() as session:
        counts = await repo.count_rows(session)
    assert set(counts.values()) == {0}, counts


@pytest.mark.parametrize(
    ("case", "expected_in_message"),
    [
        ("a-wrong-in-width", "[8, 575]"),
        ("layer-out-of-range", "layer 30"),
        ("rank-above-max", "rank 129"),
        ("nan", "layers.1.self_attn.v_proj.lora_A"),
        ("dora", "use_dora"),
        ("modules-to-save", "modules_to_save"),
        ("fan-in-fan-out", "fan_in_fan_out"),
        ("unknown-module", "rotary_emb"),
        ("tar-path-traversal", "../../adapter_config.json"),
    ],
)
def test_refusal_names_the_offending_key_shape_or_value(case: str, expected_in_message: str, tmp_path: Path) -> None:
    source = next(c[1] for c in CASES if c[0] == case)(tmp_path)
    with pytest.raises(errors.AdapterInvalid) as info:
        validate(read_upload(source), SPEC, max_rank=128)
    assert expected_in_message in str(info.value)


def test_valid_adapter_resolves_rank_and_alpha_patterns() -> None:
    tensors = lora_tensors(modules=("q_proj", "v_proj"), layers=(0, 1))
    tensors[key(1, "v_proj", "A")] = torch.randn(4, 576)
    tensors[key(1, "v_proj", "B")] = torch.randn(192, 4)
    cfg = config(rank_pattern={"layers.1.self_attn.v_proj": 4}, alpha_pattern={"q_proj": 32}, use_rslora=True)
    adapter = validate(UploadFiles(**dict(zip(("config", "weights"), files(cfg, tensors).values(), strict=True))),
                       SPEC)
    assert adapter.modules[(1, "v_proj")].rank == 4
    assert adapter.modules[(0, "v_proj")].rank == 8
    assert adapter.modules[(0, "q_proj")].alpha == 32
    assert adapter.modules[(0, "v_proj")].alpha == 16
    # rsLoRA: alpha / sqrt(r)
    assert adapter.scale(1, "v_proj") == pytest.approx(16 / 2)
    assert adapter.scale(0, "q_proj") == pytest.approx(32 / 8 ** 0.5)
    assert adapter.max_rank == 8 and adapter.target_modules == ["q_proj", "v_proj"] and adapter.num_layers == 2


def test_canonical_blob_is_deterministic_and_round_trips() -> None:
    f = files()
    upload = UploadFiles(config=f["adapter_config.json"], weights=f["adapter_model.safetensors"])
    a = validate(upload, SPEC)
    blob = canonical_blob(a)
    # Same content with other key order and other JSON formatting -> the same blob and hash.
    reordered = dict(reversed(list(lora_tensors().items())))
    cfg_pretty = json.dumps(config(), indent=4).encode()
    b = validate(UploadFiles(config=cfg_pretty, weights=save_safetensors(reordered)), SPEC)
    assert canonical_blob(b) == blob
    back = load_canonical(blob)
    assert back.modules == a.modules
    assert back.use_rslora == a.use_rslora and back.lora_alpha == a.lora_alpha
    for k, t in a.tensors.items():
        assert torch.equal(back.tensors[k], t)
    assert len(blob_sha256(blob)) == 64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_narrowed_blob_holds_the_tensors_as_a_pool_of_that_dtype_would(dtype: torch.dtype) -> None:
    """What a worker's host tier keeps: the float32 blob's tensors rounded to the pool's dtype, exactly as the
    pool's own conversion rounds them, in about half the bytes; settings and modules unchanged."""
    f = files()
    a = validate(UploadFiles(config=f["adapter_config.json"], weights=f["adapter_model.safetensors"]), SPEC)
    blob = canonical_blob(a)
    narrow = narrowed_blob(blob, dtype)
    assert len(narrow) < 0.55 * len(blob)
    back, wide = load_canonical(narrow), load_canonical(blob)
    assert (back.modules, back.lora_alpha, back.use_rslora, back.base_model) == (
        wide.modules, wide.lora_alpha, wide.use_rslora, wide.base_model)
    assert back.dtype == {torch.bfloat16: "BF16", torch.float16: "F16"}[dtype] and wide.dtype == "F32"
    assert set(back.tensors) == set(wide.tensors)
    for k, t in wide.tensors.items():
        pool = torch.empty(t.shape, dtype=dtype)
        pool.copy_(t)  # how the adapter pool converts what it copies in
        assert back.tensors[k].dtype == dtype and torch.equal(back.tensors[k], pool), k
    assert narrowed_blob(narrow, dtype) is narrow  # nothing wider left: the same blob
    assert narrowed_blob(blob, torch.float32) is blob


@pytest.mark.parametrize("packing", ["directory", "tar.gz", "zip", "tar.gz-nested-dir"])
def test_upload_packings_read_the_same(packing: str, tmp_path: Path) -> None:
    f = files()
    source: Path | bytes
    if packing == "directory":
        source = directory(tmp_path, {**f, "README.md": b"# adapter"})
    elif packing == "tar.gz":
        source = tar_gz(f)
    elif packing == "zip":
        source = zip_bytes(f)
    else:
        source = tar_gz({f"my-adapter/{k}": v for k, v in f.items()})
    upload = read_upload(source)
    assert upload.config == f["adapter_config.json"]
    assert upload.weights == f["adapter_model.safetensors"]


def test_real_peft_adapter_validates(make_peft_adapter) -> None:
    path = make_peft_adapter(
        r=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        rank_pattern={"down_proj": 16}, alpha_pattern={"k_proj": 4}, use_rslora=True,
    )
    adapter = validate(read_upload(path), SPEC)
    assert adapter.modules[(0, "down_proj")].rank == 16
    assert adapter.modules[(1, "q_proj")].rank == 8
    assert adapter.modules[(0, "k_proj")].alpha == 4
    assert adapter.use_rslora
    assert adapter.target_modules == list(SPEC.module_shapes())


def test_keys_with_an_adapter_name_are_accepted() -> None:
    named = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
             for k, v in lora_tensors().items()}
    adapter = validate(UploadFiles(config=json.dumps(config()).encode(), weights=save_safetensors(named)), SPEC)
    plain = validate(UploadFiles(config=json.dumps(config()).encode(), weights=save_safetensors(lora_tensors())), SPEC)
    assert canonical_blob(adapter) == canonical_blob(plain)
