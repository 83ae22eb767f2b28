# The official Python client (elasticsearch 8.x) against a running `gantry search serve`.
# Not part of the test suite (it needs the client from PyPI); run it by hand:
#   python3 -m venv /tmp/esvenv && /tmp/esvenv/bin/pip install 'elasticsearch>=8.15,<9'
#   gantry search serve --listen 127.0.0.1:9277 --data /tmp/es-check &
#   /tmp/esvenv/bin/python crates/gantry-search/tests/clients/python_client.py http://127.0.0.1:9277
# It exits non-zero on the first call that fails.
import sys
from elasticsearch import Elasticsearch, helpers, ConflictError, NotFoundError, BadRequestError
es = Elasticsearch(sys.argv[1])
info = es.info()
print("info:", info["version"]["number"], info["tagline"])
es.indices.create(index="books", mappings={"properties": {"title": {"type": "text"}, "year": {"type": "integer"}, "tag": {"type": "keyword"}}})
print("exists:", es.indices.exists(index="books").body)
r = es.index(index="books", id="1", document={"title": "The quick brown fox", "year": 2020, "tag": "a"}, refresh=True)
print("index:", r["result"], r["_version"], r["_seq_no"])
try:
    es.index(index="books", id="1", document={"title": "x"}, if_seq_no=99, if_primary_term=1)
except ConflictError as e:
    print("conflict:", e.meta.status, e.error)
ok, errors = helpers.bulk(es, ({"_index": "books", "_id": str(i), "title": f"book {i} fox" if i % 2 else f"book {i}", "year": 2000 + i, "tag": "b"} for i in range(2, 102)), refresh=True)
print("bulk ok:", ok, "errors:", errors)
r = es.search(index="books", query={"bool": {"must": {"match": {"title": "fox"}}, "filter": {"range": {"year": {"gte": 2050}}}}}, sort=[{"year": "desc"}], size=3)
print("search:", r["hits"]["total"], [h["_id"] for h in r["hits"]["hits"]])
r = es.search(index="books", size=0, aggs={"tags": {"terms": {"field": "tag"}}, "y": {"stats": {"field": "year"}}})
print("aggs:", r["aggregations"]["tags"]["buckets"], r["aggregations"]["y"]["max"])
print("count:", es.count(index="books")["count"])
print("get:", es.get(index="books", id="1")["_source"])
es.update(index="books", id="1", doc={"year": 2021}, refresh=True)
print("updated:", es.get(index="books", id="1")["_source"]["year"])
print("mget:", [d["found"] for d in es.mget(index="books", ids=["1", "nope"])["docs"]])
print("dbq:", es.delete_by_query(index="books", query={"term": {"tag": "b"}}, refresh=True)["deleted"])
try:
    es.get(index="missing", id="1")
except NotFoundError as e:
    print("missing index:", e.meta.status, e.error)
try:
    es.search(index="books", query={"nonsense": {}})
except BadRequestError as e:
    print("bad query:", e.meta.status, e.error)
print("cat:", es.cat.indices(index="books", format="json")[0]["docs.count"])
print("health:", es.cluster.health()["status"])
es.indices.delete(index="books")
print("deleted:", es.indices.exists(index="books").body)
