"""`python -m batchllm_cli` = the `batchllm` command."""
from batchllm_cli.app import main

main()
