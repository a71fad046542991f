"""Classroom assignments: a workbook generated from the package, graded by pytest with points and hints.

- `regions`: the `# BEGIN SOLUTION chNN.name` / `# END SOLUTION` markers that make a function an exercise;
- `tasks`: the list of exercises, each with its hint and chapter section;
- `workbook`: `minildm workbook build`, the student's copy with the solutions replaced by stubs;
- `grader`: `minildm grade`, which runs the task tests (tests/tasks) on a copy of the student's package;
- `plugin`, `importcheck`: the parts that run inside the graded process, which import nothing from minildm.
"""
