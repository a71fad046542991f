"""Classroom assignments: a workbook generated from the package, graded by pytest with points and hints.

- `regions`: the `# BEGIN SOLUTION chNN.name` / `# END SOLUTION` markers that make a function an exercise;
- `tasks`: the list of exercises, each with its hint and chapter section;
- `workbook`: `minildm workbook build`, the student's copy with the solutions replaced by stubs;
- `grader`: `minildm grade`, which runs the task tests (tests/tasks) on a copy of the student's package;
- `plugin`, `importcheck`: the parts that run inside the graded process, which import nothing from minildm;
- `isolation`, `launch`: the walls around that process (namespaces, a user id of its own, limits), and the level
  the report names;
- `codec`, `worker`, `proxy`: issue 18's next step, not wired in yet: the JSON + safetensors wire format, the worker
  that answers calls of graded functions, and the grader's stand-in for such a function, so that the tests can
  move out of the student's process.
"""
