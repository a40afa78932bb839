"""What the tests share that is not a fixture: helper modules imported as ``support.<module>``.

pytest puts tests/ on sys.path (``pythonpath`` in pyproject.toml), so ``import support.runs`` works from
every folder; the fixtures stay in the conftest.py files. A test module never imports another test module:
what two of them share lives here (functions, classes) or in a conftest.py (fixtures).
"""
