"""Teaching material generated from the code: the side-by-side site (``densenet teach``), the
notebooks' conversion and the book's exercises (``densenet exercise``).

Importing it imports no framework: code is read from the files with ``ast``, the facts come from
``common.arch`` and the numpy oracle; frameworks load only for the options that measure them.
"""

from common.teach.page import SiteOptions, build_site
from common.teach.sources import ROWS, Piece, Source, SourceError, extract

__all__ = ["ROWS", "Piece", "SiteOptions", "Source", "SourceError", "build_site", "extract"]
