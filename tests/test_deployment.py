"""The Streamlit Community Cloud files agree with each other and with the app (the deployment itself is
rehearsed by benchmarks/cloud_rehearsal.py, too slow for the suite)."""
import re
import tomllib

from explorer.core.prompts import MAX_PROMPT_SET_BYTES
from explorer.core.runtime import REPO_ROOT


def pins(path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if m:
            found[m.group(1).lower()] = m.group(2)
    return found


def test_cloud_installs_a_cpu_torch_of_the_tested_version_then_requirements_txt():
    cloud = (REPO_ROOT / "requirements-cloud.txt").read_text().splitlines()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in cloud
    assert "-r requirements.txt" in cloud
    tested = pins(REPO_ROOT / "requirements.txt")["torch"]
    assert pins(REPO_ROOT / "requirements-cloud.txt")["torch"] == f"{tested}+cpu"
    # requirements.txt, which local and CI installs read, names no extra index (an unreachable one costs
    # pip retries for every package).
    assert "index-url" not in (REPO_ROOT / "requirements.txt").read_text()


def test_cloud_reads_environment_yml_first_and_it_points_at_the_cloud_requirements():
    # Cloud's order: uv.lock, Pipfile, environment.yml, requirements.txt, pyproject.toml.
    assert not (REPO_ROOT / "uv.lock").exists() and not (REPO_ROOT / "Pipfile").exists()
    env = (REPO_ROOT / "environment.yml").read_text()
    assert re.search(r"^\s*- python=3\.11\s*$", env, re.M)
    assert re.search(r"^\s*- -r requirements-cloud\.txt\s*$", env, re.M)


def test_streamlit_config_hides_developer_controls_and_caps_uploads():
    config = tomllib.loads((REPO_ROOT / ".streamlit" / "config.toml").read_text())
    assert config["client"]["toolbarMode"] == "viewer"
    assert config["server"]["maxUploadSize"] * 2 ** 20 == MAX_PROMPT_SET_BYTES
    assert config["theme"]["base"] in ("light", "dark")
