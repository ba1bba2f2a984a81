"""Sample-quality evaluation: FID / sFID / IS / precision-recall (``fid``), feature networks (``features``)."""
