import os

# The hub is unreachable here and in CI; without this every hub lookup stalls ~48 s first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
