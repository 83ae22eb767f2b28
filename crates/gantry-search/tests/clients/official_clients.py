"""An official Python client, unmodified, against a running `gantry search serve`.

    python official_clients.py elasticsearch|opensearch URL

Run by the test suite (crates/gantry/tests/it/search_clients.rs) with each client that
scripts/test installs: elasticsearch 8.x, elasticsearch 9.x and opensearch-py. Every step
asserts what it got; the first failure exits non-zero with the traceback.
"""

import sys

flavor, url = sys.argv[1], sys.argv[2]
if flavor == "elasticsearch":
    from elasticsearch import BadRequestError, ConflictError, Elasticsearch, NotFoundError, helpers

    client = Elasticsearch(url)

    def call(method, **kw):
        return method(**kw)

else:
    from opensearchpy import OpenSearch, helpers
    from opensearchpy.exceptions import ConflictError, NotFoundError
    from opensearchpy.exceptions import RequestError as BadRequestError

    client = OpenSearch(hosts=[url])

    def call(method, **kw):
        # opensearch-py takes request bodies as `body`.
        body = {}
        for key in ("mappings", "query", "aggs", "sort", "size", "doc", "document"):
            if key in kw:
                body[key] = kw.pop(key)
        if "document" in body:
            body = body["document"]
        if body:
            kw["body"] = body
        return method(**kw)


info = client.info()
assert info["version"]["number"].startswith("8."), info
assert info["tagline"] == "You Know, for Search", info

index = f"clients-{flavor}"
if client.indices.exists(index=index):
    client.indices.delete(index=index)
call(
    client.indices.create,
    index=index,
    mappings={
        "properties": {
            "title": {"type": "text"},
            "year": {"type": "integer"},
            "tag": {"type": "keyword"},
        }
    },
)
assert client.indices.exists(index=index)

r = call(client.index, index=index, id="1", document={"title": "The quick brown fox", "year": 2020, "tag": "a"}, refresh=True)
assert r["result"] == "created" and r["_version"] == 1, r
try:
    call(client.index, index=index, id="1", document={"title": "x"}, if_seq_no=99, if_primary_term=1)
    raise AssertionError("a stale if_seq_no was accepted")
except ConflictError as e:
    assert "version_conflict_engine_exception" in str(e), e

docs = (
    {"_index": index, "_id": str(i), "title": f"book {i} fox" if i % 2 else f"book {i}", "year": 2000 + i, "tag": "b"}
    for i in range(2, 102)
)
ok, errors = helpers.bulk(client, docs, refresh=True)
assert ok == 100 and not errors, (ok, errors)

r = call(
    client.search,
    index=index,
    query={"bool": {"must": {"match": {"title": "fox"}}, "filter": {"range": {"year": {"gte": 2090}}}}},
    sort=[{"year": "desc"}],
    size=3,
)
# Odd i from 91 to 101 hold "fox": 91, 93, ..., 101 -> years 2091..2101, the top three by year.
assert r["hits"]["total"]["value"] == 6, r["hits"]["total"]
assert [h["_id"] for h in r["hits"]["hits"]] == ["101", "99", "97"], r["hits"]["hits"]

r = call(client.search, index=index, size=0, aggs={"tags": {"terms": {"field": "tag"}}, "y": {"stats": {"field": "year"}}})
buckets = {b["key"]: b["doc_count"] for b in r["aggregations"]["tags"]["buckets"]}
assert buckets == {"b": 100, "a": 1}, buckets
assert r["aggregations"]["y"]["max"] == 2101 and r["aggregations"]["y"]["count"] == 101, r["aggregations"]["y"]

assert client.count(index=index)["count"] == 101
assert client.get(index=index, id="1")["_source"]["year"] == 2020
call(client.update, index=index, id="1", doc={"year": 2021}, refresh=True)
assert client.get(index=index, id="1")["_source"]["year"] == 2021
found = [d["found"] for d in client.mget(index=index, body={"ids": ["1", "nope"]})["docs"]]
assert found == [True, False], found
deleted = call(client.delete_by_query, index=index, query={"term": {"tag": "b"}}, refresh=True)["deleted"]
assert deleted == 100, deleted

try:
    client.get(index="no-such-index", id="1")
    raise AssertionError("a missing index was found")
except NotFoundError as e:
    assert "index_not_found_exception" in str(e), e
try:
    call(client.search, index=index, query={"nonsense": {}})
    raise AssertionError("an unknown query type was accepted")
except BadRequestError as e:
    assert "parsing_exception" in str(e), e

cat = client.cat.indices(index=index, format="json")
assert cat[0]["docs.count"] == "1", cat
assert client.cluster.health()["status"] in ("green", "yellow")
client.indices.delete(index=index)
assert not client.indices.exists(index=index)
print(f"{flavor}: every step passed")
