"""The book: the chapters, the notebooks and the package's source built into an offline static website.

    python -m minildm.book build --out site/
    python -m http.server -d site 8000          # then open http://localhost:8000

`stage.py` lays the sources out for the generator (links from quotes to the source, notebook download links,
the front page from the README); `build.py` runs Sphinx (MyST-NB, the Sphinx Book Theme, MathJax from a local
copy) and says why that generator. Tooling, like quotes.py: the concepts never import it.
"""
