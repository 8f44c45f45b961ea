# The config files, read strictly before Snakemake loads them: its own reader reports a YAML
# syntax error without file or line and keeps the last of a key given twice. Here either
# stops the DAG with one line naming the file and the line.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from peftlab.config import check_config_files
from peftlab.errors import PeftlabError

try:
    check_config_files(workflow.overwrite_configfiles or ["config/config.yaml"])
except PeftlabError as exc:
    sys.exit(f"peftlab: {exc}")
