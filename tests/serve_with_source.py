"""Run the real server with another number source, for tests that push odd data through the stream.

    python tests/serve_with_source.py MODULE:FUNCTION [application.py's arguments]

For example ``python tests/serve_with_source.py sources:markup --port 5001``: every broadcast then
carries what ``sources.markup()`` returns instead of a random number.
"""
import importlib
import sys
from pathlib import Path

tests_folder = Path(__file__).resolve().parent
sys.path[:0] = [str(tests_folder), str(tests_folder.parent)]

import application  # noqa: E402  (after the path is set)

module_name, function_name = sys.argv.pop(1).split(":")
application.next_number = getattr(importlib.import_module(module_name), function_name)
application.main()
