"""The FakeHub against the real huggingface_hub client.

The real Hugging Face Hub is unreachable here, so - as the project rule allows for the HF Hub
only - it is faked at its HTTP boundary: ``tests/fakehub.py`` serves the Hub's HTTP API on
127.0.0.1 and these tests drive the unmodified ``huggingface_hub`` client (``HfApi``,
``hf_hub_download``, ``HfFileSystem``) against it over real sockets.
"""

import hashlib
import json
import os
import urllib.request

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    constants,
    hf_hub_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils._runtime import is_xet_available

from tests import fakehub
from tests.fakehub import FakeHub

fake_hub = fakehub.fake_hub  # the fixture, requested by name below

REPO = "org/model"
CONFIG = b'{"model_type": "llama"}'
WEIGHTS = os.urandom(4096)  # *.safetensors: LFS whatever its size


def _gets(hub: FakeHub, fragment: str) -> list[int]:
    """Indexes of the GET requests whose path contains ``fragment``."""
    return [i for i, (m, p) in enumerate(hub.requests) if m == "GET" and fragment in p]


def test_fixture_points_the_client_at_the_fake(fake_hub, tmp_path):
    assert constants.ENDPOINT == fake_hub.url
    assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(fake_hub.url)
    assert not constants.HF_HUB_OFFLINE
    assert not is_xet_available()
    assert constants.HF_HUB_CACHE.startswith(str(tmp_path))
    assert HfApi().endpoint == HfFileSystem().endpoint == fake_hub.url
    assert HfApi().whoami()["name"] == fake_hub.username


def test_repo_info_tree_and_revisions(fake_hub):
    first = fake_hub.add_repo(REPO, {"config.json": CONFIG, "model.safetensors": WEIGHTS})
    second = fake_hub.add_repo(REPO, {"config.json": b"{}", "sub/dir/notes.txt": b"hi"})
    assert fake_hub.commits(REPO) == [second, first]
    api = HfApi()

    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == second
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {"config.json", "model.safetensors", "sub/dir/notes.txt"}
    assert siblings["config.json"].lfs is None and siblings["config.json"].size == 2
    lfs = siblings["model.safetensors"].lfs
    assert lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert lfs.size == siblings["model.safetensors"].size == len(WEIGHTS)
    assert api.repo_info(REPO, revision=first).sha == first
    assert api.model_info(REPO, revision="main").sha == second
    assert api.resolve_revision(REPO).resolved == second

    assert sorted(api.list_repo_files(REPO)) == sorted(siblings)
    assert sorted(api.list_repo_files(REPO, revision=first)) == ["config.json", "model.safetensors"]
    tree = {e.path: e for e in api.list_repo_tree(REPO, recursive=True, expand=True)}
    assert set(tree) == {*siblings, "sub", "sub/dir"}
    assert tree["model.safetensors"].lfs.sha256 == lfs.sha256
    assert tree["model.safetensors"].last_commit.oid == first
    assert tree["config.json"].last_commit.oid == second
    top = [e.path for e in api.list_repo_tree(REPO)]
    assert sorted(top) == ["config.json", "model.safetensors", "sub"]
    paths = api.get_paths_info(REPO, ["config.json", "sub", "missing"], revision=first)
    assert [p.path for p in paths] == ["config.json"]

    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="nope")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.txt")
    assert api.file_exists(REPO, "config.json") and not api.file_exists(REPO, "missing.txt")

    api.create_branch(REPO, branch="v1", revision=first)
    assert api.model_info(REPO, revision="v1").sha == first
    assert {b.name for b in api.list_repo_refs(REPO).branches} == {"main", "v1"}
    assert [c.commit_id for c in api.list_repo_commits(REPO)] == [second, first]


def test_tree_pagination(fake_hub):
    fake_hub.add_repo(REPO, {f"f{i}.txt": b"x" for i in range(7)})
    fake_hub.tree_page_size = 3
    assert len(HfApi().list_repo_files(REPO)) == 7
    assert len(_gets(fake_hub, "/tree/")) == 3


def test_download_round_trip_and_cached_rerun(fake_hub, tmp_path):
    sha = fake_hub.add_repo(REPO, {"config.json": CONFIG, "model.safetensors": WEIGHTS})
    for name, data in [("config.json", CONFIG), ("model.safetensors", WEIGHTS)]:
        with open(hf_hub_download(REPO, name), "rb") as f:
            assert f.read() == data
    assert hf_hub_download(REPO, "config.json", revision=sha).endswith(f"{sha}/config.json")

    fake_hub.clear_log()
    hf_hub_download(REPO, "model.safetensors")  # "main": a HEAD to resolve it, no GET
    assert [m for m, _ in fake_hub.requests] == ["HEAD"]
    fake_hub.clear_log()
    hf_hub_download(REPO, "model.safetensors", revision=sha)  # commit sha: no request at all
    assert fake_hub.requests == []

    other = tmp_path / "other-cache"
    hf_hub_download(REPO, "config.json", cache_dir=other)
    assert (other / "models--org--model" / "refs" / "main").read_text() == sha


def test_download_resumes_after_truncated_body(fake_hub):
    # http_get keeps only whole DOWNLOAD_CHUNK_SIZE (10 MiB) chunks: cut at 12 MiB, resume at 10
    data = os.urandom(24 * 1024 * 1024)
    fake_hub.add_repo(REPO, {"model.safetensors": data})
    fake_hub.fail_next("/resolve/", kind="truncate", method="GET")
    with open(hf_hub_download(REPO, "model.safetensors"), "rb") as f:
        assert f.read() == data
    first, second = _gets(fake_hub, "/resolve/")
    assert "range" not in fake_hub.request_headers[first]
    assert fake_hub.request_headers[second]["range"] == f"bytes={constants.DOWNLOAD_CHUNK_SIZE}-"


@pytest.mark.slow
def test_server_errors_and_dropped_connections_are_retried(fake_hub):
    fake_hub.add_repo(REPO, {"config.json": CONFIG})
    fake_hub.fail_next("/tree/", kind=500)
    assert HfApi().list_repo_files(REPO) == ["config.json"]
    assert len(_gets(fake_hub, "/tree/")) == 2

    fake_hub.fail_next("/resolve/", kind=503, method="HEAD")
    with open(hf_hub_download(REPO, "config.json"), "rb") as f:
        assert f.read() == CONFIG
    heads = [p for m, p in fake_hub.requests if m == "HEAD"]
    assert heads == ["/org/model/resolve/main/config.json"] * 2

    fake_hub.clear_log()
    fake_hub.fail_next("/tree/", kind="drop")
    assert HfApi().list_repo_files(REPO) == ["config.json"]
    assert len(_gets(fake_hub, "/tree/")) == 2


def test_hf_file_system_read(fake_hub):
    first = fake_hub.add_repo(REPO, {"config.json": CONFIG, "model.safetensors": WEIGHTS})
    fake_hub.add_repo(REPO, {"config.json": b"{}", "sub/notes.txt": b"hi"})
    fs = HfFileSystem()

    assert sorted(fs.ls(REPO, detail=False)) == [
        f"{REPO}/{p}" for p in ("config.json", "model.safetensors", "sub")
    ]
    assert fs.find(f"hf://{REPO}") == [
        f"{REPO}/{p}" for p in ("config.json", "model.safetensors", "sub/notes.txt")
    ]
    assert fs.find(f"hf://{REPO}@{first}") == [
        f"{REPO}@{first}/{p}" for p in ("config.json", "model.safetensors")
    ]
    assert fs.exists(f"hf://{REPO}/sub/notes.txt") and not fs.exists(f"hf://{REPO}/nope.txt")
    assert not fs.exists("hf://org/missing/config.json")

    info = fs.info(f"hf://{REPO}/model.safetensors")  # from the `ls` cache: every key
    assert info["type"] == "file" and info["size"] == len(WEIGHTS)
    assert info["lfs"]["sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    assert info["lfs"]["size"] == len(WEIGHTS) and "pointer_size" in info["lfs"]
    fresh = fs.info(f"hf://{REPO}/model.safetensors", refresh=True)  # paths-info: name/size/type
    assert fresh == {"name": f"{REPO}/model.safetensors", "size": len(WEIGHTS), "type": "file"}
    assert fs.info(f"hf://{REPO}/sub")["type"] == "directory"

    assert fs.cat(f"hf://{REPO}@{first}/config.json") == CONFIG
    assert fs.cat(f"hf://{REPO}/config.json") == b"{}"
    fake_hub.clear_log()
    with fs.open(f"hf://{REPO}/model.safetensors", "rb", block_size=1024) as f:
        f.seek(1000)
        assert f.read(100) == WEIGHTS[1000:1100]
        f.seek(-10, 2)
        assert f.read() == WEIGHTS[-10:]
    ranges = [h["range"] for h in fake_hub.request_headers if "range" in h]
    assert ranges[0].startswith("bytes=1000-") and ranges[-1] == "bytes=4086-4095", ranges
    assert fs.ls(f"{REPO}/sub/notes.txt", detail=False) == [f"{REPO}/sub/notes.txt"]
    assert fs.find(f"{REPO}/sub/notes.txt") == [f"{REPO}/sub/notes.txt"]


def test_hf_file_system_write(fake_hub, tmp_path):
    HfApi().create_repo(REPO)
    fs = HfFileSystem()
    fs.pipe_file(f"hf://{REPO}/a.txt", b"a")
    local = tmp_path / "w.safetensors"
    local.write_bytes(WEIGHTS)
    fs.put_file(str(local), f"hf://{REPO}/dir/w.safetensors")
    assert fs.cat(f"hf://{REPO}/dir/w.safetensors") == WEIGHTS
    files = fake_hub.files(REPO)
    assert files["a.txt"] == b"a" and files["dir/w.safetensors"] == WEIGHTS
    assert ("POST", f"/{REPO}.git/info/lfs/objects/batch") in fake_hub.requests

    fs.rm(f"hf://{REPO}/a.txt")
    assert "a.txt" not in fake_hub.files(REPO)
    assert not fs.exists(f"hf://{REPO}/a.txt")
    assert len(fake_hub.commits(REPO)) == 4  # initial commit + pipe + put + rm


def test_upload_over_10_mb_goes_through_lfs(fake_hub, tmp_path):
    big = os.urandom(11 * 1024 * 1024)
    path = tmp_path / "big.bin"
    path.write_bytes(big)
    api = HfApi()
    api.create_repo(REPO)
    fake_hub.clear_log()
    commit = api.upload_file(path_or_fileobj=str(path), path_in_repo="big.bin", repo_id=REPO)
    assert commit.oid == fake_hub.commits(REPO)[0]
    posts = [p for m, p in fake_hub.requests if m in ("POST", "PUT")]
    assert posts == [
        f"/api/models/{REPO}/preupload/main",
        f"/{REPO}.git/info/lfs/objects/batch",
        posts[2],  # the presigned upload URL
        f"/{REPO}.git/info/lfs/objects/verify",
        f"/api/models/{REPO}/commit/main",
    ]
    assert fake_hub.files(REPO)["big.bin"] == big
    sibling = next(
        s for s in api.model_info(REPO, files_metadata=True).siblings if s.rfilename == "big.bin"
    )
    assert sibling.lfs is not None and sibling.lfs.size == len(big)
    with open(hf_hub_download(REPO, "big.bin"), "rb") as f:
        assert f.read() == big

    fake_hub.clear_log()  # same content again: the LFS object is known, nothing re-uploaded
    api.upload_file(path_or_fileobj=big, path_in_repo="copy.bin", repo_id=REPO)
    assert not [p for m, p in fake_hub.requests if m == "PUT"]
    assert fake_hub.files(REPO)["copy.bin"] == big


def test_upload_folder_create_commit_and_delete(fake_hub, tmp_path):
    api = HfApi()
    url = api.create_repo(REPO, exist_ok=True)
    assert api.create_repo(REPO, exist_ok=True) == url
    assert url.repo_id == REPO
    assert set(fake_hub.files(REPO)) == {".gitattributes"}  # the Hub's "initial commit"

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "README.md").write_text("# hi\n")
    (folder / "config.json").write_bytes(CONFIG)
    (folder / "sub" / "model.safetensors").write_bytes(WEIGHTS)
    api.upload_folder(folder_path=folder, repo_id=REPO)
    assert fake_hub.files(REPO)["sub/model.safetensors"] == WEIGHTS
    assert ("POST", "/api/validate-yaml") in fake_hub.requests

    api.create_commit(
        REPO,
        operations=[
            CommitOperationAdd("new.txt", b"new"),
            CommitOperationDelete("config.json"),
            CommitOperationDelete("sub/"),
        ],
        commit_message="mixed",
    )
    assert set(fake_hub.files(REPO)) == {".gitattributes", "README.md", "new.txt"}
    api.delete_file("new.txt", REPO)
    assert "new.txt" not in fake_hub.files(REPO)
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("new.txt", REPO)
    assert [c.title for c in api.list_repo_commits(REPO)][:2] == [
        "Delete new.txt with huggingface_hub",
        "mixed",
    ]

    api.delete_repo(REPO)
    assert not api.repo_exists(REPO)


def test_private_repo_needs_the_token(fake_hub, tmp_path):
    api = HfApi()
    api.create_repo(REPO, private=True)
    api.upload_file(path_or_fileobj=CONFIG, path_in_repo="config.json", repo_id=REPO)
    assert api.model_info(REPO).private is True

    anonymous = HfApi(token=False)
    with pytest.raises(RepositoryNotFoundError) as err:
        anonymous.model_info(REPO)
    assert err.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "config.json", token=False, cache_dir=tmp_path / "c")
    with pytest.raises(RepositoryNotFoundError):
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=REPO)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").model_info(REPO)
    assert err.value.response.status_code == 401
    assert not isinstance(err.value, RepositoryNotFoundError)
    assert not HfFileSystem(token=False).exists(f"hf://{REPO}/config.json")
    assert HfFileSystem().cat(f"hf://{REPO}/config.json") == CONFIG


def test_standalone_context_manager():
    with FakeHub() as hub:
        sha = hub.add_repo("a/b", {"x.txt": b"x"})
        assert hub.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{hub.url}/api/models/a/b") as response:
            assert json.load(response)["sha"] == sha
        with urllib.request.urlopen(f"{hub.url}/a/b/resolve/{sha}/x.txt") as response:
            assert response.read() == b"x" and response.headers["X-Repo-Commit"] == sha
