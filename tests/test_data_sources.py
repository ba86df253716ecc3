"""Text sources: file kinds, offline demo domains, and the errors for bad inputs."""

import ast
import gzip
import json

import pytest

from cpt_jax.data import sources
from cpt_jax.data.sources import DomainError


def test_text_glob_reads_one_document_per_file_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third")
    domain = {"name": "t", "kind": "text_glob", "pattern": str(tmp_path / "**" / "*.txt")}
    assert list(sources.iter_documents(domain)) == ["first", "second", "third"]
    assert sources.validate_domain(domain)["pattern"] == [domain["pattern"]]


def test_jsonl_plain_and_gzip(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n"
                                      + json.dumps({"text": "two", "x": 1}) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "three"}) + "\n")
    domain = {"name": "j", "kind": "jsonl", "pattern": str(tmp_path / "*.jsonl*")}
    assert list(sources.iter_documents(domain)) == ["one", "two", "three"]
    capped = dict(domain, max_docs=2)
    assert list(sources.iter_documents(capped)) == ["one", "two"]


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    domain = {"name": "j", "kind": "jsonl", "pattern": str(path)}
    with pytest.raises(DomainError, match=rf"{path}:2 has no field 'text'.*\"field\""):
        list(sources.iter_documents(domain))
    with pytest.raises(DomainError, match=r"a.jsonl:1 has no field 'content'"):
        sources.validate_domain(dict(domain, field="content"))


def test_bad_json_and_bad_utf8_are_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DomainError, match=r"a.jsonl:2 is not valid JSON"):
        list(sources.iter_documents({"name": "j", "kind": "jsonl",
                                     "pattern": str(tmp_path / "*.jsonl")}))
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    domain = {"name": "t", "kind": "text_glob", "pattern": str(tmp_path / "bad.txt")}
    with pytest.raises(DomainError, match=r"bad.txt is not valid UTF-8.*encoding_errors"):
        list(sources.iter_documents(domain))
    assert list(sources.iter_documents(dict(domain, encoding_errors="replace"))) == [
        "caf\ufffd"]


def test_missing_path_is_a_clear_error(tmp_path):
    domain = {"name": "en", "kind": "text_glob", "pattern": str(tmp_path / "nope" / "*.txt")}
    with pytest.raises(DomainError, match=r"Domain 'en': no files match .*nope"):
        sources.validate_domain(domain)


def test_empty_source_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("  \n")
    domain = {"name": "en", "kind": "text_glob", "pattern": str(tmp_path / "*.txt")}
    with pytest.raises(DomainError, match=r"Domain 'en': the source has no non-empty"):
        sources.validate_domain(domain)


@pytest.mark.parametrize("spec, message", [
    ({"name": "x", "kind": "csv", "pattern": "a"}, r"unknown kind 'csv'"),
    ({"name": "x", "kind": "text_glob"}, r"needs the key 'pattern'"),
    ({"name": "x", "kind": "text_glob", "patern": "a", "pattern": "b"},
     r"unknown keys \['patern'\]"),
    ({"kind": "text_glob", "pattern": "a"}, r"needs a 'name'"),
    ({"name": "a/b", "kind": "text_glob", "pattern": "a"}, r"usable as a folder name"),
    ({"kind": "demo", "demo": "klingon"}, r"unknown demo 'klingon'"),
    ({"kind": "demo", "demo": "python_docs", "max_chars": 0}, r"max_chars must be"),
    ("en", r"must be a dict"),
])
def test_bad_specs(spec, message):
    with pytest.raises(DomainError, match=message):
        sources.normalize_domain(spec)


def test_config_dict_is_accepted():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict({"kind": "demo", "demo": "unicode_table",
                                     "max_chars": 5000})
    assert sources.normalize_domain(cfg)["name"] == "unicode_table"


@pytest.mark.parametrize("demo", sources.DEMOS)
def test_demo_sources_are_deterministic_and_capped(demo):
    domain = {"kind": "demo", "demo": demo, "max_chars": 60_000}
    docs = list(sources.iter_documents(domain))
    assert docs == list(sources.iter_documents(domain))
    total = sum(map(len, docs))
    assert 60_000 <= total < 60_000 + max(map(len, docs)) + 1
    assert all(d.strip() for d in docs)
    # it is a real description of the source: another demo has another fingerprint
    other = next(d for d in sources.DEMOS if d != demo)
    assert sources.source_fingerprint(domain) != sources.source_fingerprint(
        {**domain, "demo": other})


def test_demo_domains_look_like_their_kind():
    code = list(sources.iter_documents({"kind": "demo", "demo": "python_code",
                                        "max_chars": 200_000}))
    for doc in code:
        ast.parse(doc)  # docstring removal keeps the code valid
    docs = "".join(sources.iter_documents({"kind": "demo", "demo": "python_docs",
                                           "max_chars": 50_000}))
    assert docs.count(" the ") > 100
    table = next(iter(sources.iter_documents({"kind": "demo", "demo": "unicode_table"})))
    assert "0041;LATIN CAPITAL LETTER A;Lu;0;L;;;;;N;;0061" in table.splitlines()
