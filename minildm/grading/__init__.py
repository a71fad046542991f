"""Classroom assignments: a workbook generated from the package, graded by pytest with points and hints.

- `regions`: the `# BEGIN SOLUTION chNN.name` / `# END SOLUTION` markers that make a function an exercise;
- `tasks`: the list of exercises, each with its hint and chapter section;
- `workbook`: `minildm workbook build`, the student's copy with the solutions replaced by stubs;
- `grader`: `minildm grade`; `scratch` (the student's copy and the worker's folder), `runner` (the trusted pytest
  run, watched), `report` (points, statuses, the table and grade.json);
- `trusted`, `proxy`, `forbid`: the grader's pytest process runs the task tests on the reference, with a proxy for
  every graded function and the tests' forbidden functions sent along with each call;
- `worker`, `codec`: the worker that runs the student's functions, and the JSON + safetensors wire format;
- `isolation`, `launch`, `importcheck`: the walls around the worker (namespaces, a user id of its own, limits) and
  the level the report names; the check of which student files import.
"""
