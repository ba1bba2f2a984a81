"""The committed digits teacher (a dkdm checkpoint folder); a package so that it ships as package data."""
