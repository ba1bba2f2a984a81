"""Small committed assets (the digits feature network); a package so that they ship with the wheel."""
