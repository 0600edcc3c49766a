"""Credentials inside URLs of configuration values are refused (the resolved config is written into the run directory),
and never echoed by the error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.cli import main as cli
from infra.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
ADVICE = ("would be written into the run directory's config.yaml; give it through the environment or the tool's own "
          "settings (e.g. PREFECT_API_KEY, AWS_SECRET_ACCESS_KEY, ~/.netrc, a Dask security config) and leave it out "
          "of the URL")


@pytest.mark.parametrize(("override", "shown"), [
    ("run.dask_address=tcp://alice:Hunter2@10.0.0.7:8786", "run.dask_address: a credential inside a URL "
                                                           "(tcp://alice:***@10.0.0.7:8786)"),
    # Path values (checked as given: pydantic's Path would keep one slash of `s3://`).
    ("data.url_list=s3://AKIAEXAMPLE:Hunter2@bucket/urls.parquet", "data.url_list: a credential inside a URL "
                                                                   "(s3://AKIAEXAMPLE:***@bucket/urls.parquet)"),
    ("data.url_list=https://host/u.parquet?X-Amz-Signature=Hunter2&v=1", "data.url_list: a credential inside a URL "
                                                                          "(https://host/u.parquet?X-Amz-Signature=***&v=1)"),
])
def test_a_credential_in_a_url_is_refused_without_echoing_it(override, shown):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "tiny.yaml", [override, "run.workers=0"])
    assert err.value.problems == [f"{shown} {ADVICE}", "run.workers: a number of at least 1, or auto (the CPUs this process may use) (got 0)"]
    assert "Hunter2" not in str(err.value)


def test_a_credential_nested_in_a_list_from_a_yaml_file_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"base": str(REPO / "configs" / "tiny.yaml"), "data": {"seed_sets": [
        {"name": "ok", "path": "/data/seeds"}, {"name": "remote", "path": "https://bob:Hunter2@example.org/seeds"}]}}))
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert err.value.problems == [f"data.seed_sets.1.path: a credential inside a URL "
                                  f"(https://bob:***@example.org/seeds) {ADVICE}"]


def test_urls_without_credentials_are_kept_as_given():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["run.dask_address=tcp://scheduler.example.org:8786"])
    assert cfg.run.dask_address == "tcp://scheduler.example.org:8786"


def test_lvd_run_refuses_before_creating_the_run(tmp_path, capsys):
    code = cli(["run", str(REPO / "configs" / "tiny.yaml"), f"run.root={tmp_path / 'runs'}",
                "run.dask_address=tcp://alice:Hunter2@10.0.0.7:8786"])
    out = capsys.readouterr()
    assert code == 2
    assert "run.dask_address: a credential inside a URL (tcp://alice:***@10.0.0.7:8786)" in out.err
    assert "Hunter2" not in out.out + out.err
    assert not (tmp_path / "runs").exists()
