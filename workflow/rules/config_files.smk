# The config files, read strictly before Snakemake loads them: its own reader reports a YAML
# syntax error without file or line and keeps the last of a key given twice. Here either
# stops the DAG with one line naming the file and the line.
import os
import sys
from pathlib import Path

# The workflow's own src/ comes first, here and in every job (their scripts inherit
# PYTHONPATH): the code the rerun fingerprints hash (common.smk) is the code that runs, also
# when another peftlab is installed (a copy of the workflow beside an editable install).
SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [SRC, *filter(None, [os.environ.get("PYTHONPATH")])]
)

from peftlab.config import check_config_files
from peftlab.errors import PeftlabError

try:
    check_config_files(workflow.overwrite_configfiles or ["config/config.yaml"])
except PeftlabError as exc:
    sys.exit(f"peftlab: {exc}")
