"""Which of the given modules fail to import, and which file and line is to blame (run by `minildm grade`).

Run as a script in the grading folder: `python minildm_grade_importcheck.py minildm minildm.autoencoder ...`.
It prints one JSON object: module -> null, or {"file": relative path, "line": n, "error": "SyntaxError: ..."}.
The blamed file is the deepest frame of the traceback inside the grading folder (for a SyntaxError, the file that
does not parse), so a module that fails only because it imports a broken one points at the broken one.
Standard library only: it must not depend on the code it checks.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback


def blame(err: BaseException, root: str) -> dict:
    file, line = None, 0
    if isinstance(err, SyntaxError) and err.filename:
        file, line = err.filename, err.lineno or 0
    else:
        for frame in traceback.extract_tb(err.__traceback__):
            if os.path.abspath(frame.filename).startswith(root + os.sep):
                file, line = frame.filename, frame.lineno or 0
    if file is not None:
        file = os.path.relpath(os.path.abspath(file), root).replace(os.sep, "/")
    first = str(err).splitlines()[0] if str(err) else ""
    return {"file": file, "line": line, "error": f"{type(err).__name__}: {first}"}


def main(modules: list[str]) -> None:
    root = os.path.abspath(os.getcwd())
    sys.path.insert(0, root)
    found = {}
    for name in modules:
        try:
            importlib.import_module(name)
            found[name] = None
        except BaseException as err:        # noqa: BLE001 - SystemExit or KeyboardInterrupt from student code too
            found[name] = blame(err, root)
    print(json.dumps(found))


if __name__ == "__main__":
    main(sys.argv[1:])
