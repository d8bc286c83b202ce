"""The stores versions live in: one backend per URL scheme behind the `base.Remote` protocol.

`local.py` (`file://`), `s3.py` (`s3://`, boto3), `oss.py` (`oss://`, oss2), `haystack.py`
(`haystack://`, this project's cluster); `registry.py` checks a URL and opens its backend. Every
backend passes the contract suite in tests/contract/.
"""
