"""Where lines come from: files on disk (archive.py); live tails and rawlogs later."""
