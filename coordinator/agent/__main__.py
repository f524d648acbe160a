"""`python -m coordinator.agent CONFIG [CONFIG ...]`: run one agent per config file in this process."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

from coordinator.agent.service import AgentConfig, serve


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m coordinator.agent CONFIG.json [CONFIG.json ...]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.Formatter.converter = time.gmtime
    asyncio.run(serve([AgentConfig.load(Path(p)) for p in argv]))
    return 0


raise SystemExit(main(sys.argv[1:]))
