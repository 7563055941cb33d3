"""The peer of `tidepool bench mf`: Apache Spark ALS (pyspark, local[2]) on the same train.csv and
test.csv (header user,item,rating). The training ratings are read once and cached (not timed, as
Tidepool's import is not) and one untimed fit warms the JVM; then for each maxIter in the list
one `ALS.fit` is timed (a fresh fit from the same seed, as Tidepool runs one job per epoch
count) and its model scored on the test ratings (coldStartStrategy="drop": a test user or
item absent from training is left out). Spark's ALS has no global mean term, so the ratings are
centred on the training mean before the fit and the mean added back to the predictions: the
model is then Tidepool's, mu + u . v (without this, rank 8 ALS spends a dimension on the mean
of 3 and stops near RMSE 0.5 on the rank-8 data). Spark's regParam is scaled per user and item
by their rating counts, which is Tidepool's l2 (a penalty per rating): the same objective.
Prints one JSON document: the settings and, per fit, maxIter, fit seconds and test RMSE.

    python3 benches/mf_spark.py TRAIN.csv TEST.csv [--rank 8] [--reg 0.05] \
        [--iters 1,2,5,10] [--runs 1] [--seed 7]
"""

import argparse
import json
import sys
import time

from pyspark.ml.evaluation import RegressionEvaluator
from pyspark.ml.recommendation import ALS
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import FloatType, IntegerType, StructField, StructType

SCHEMA = StructType([
    StructField("user", IntegerType(), False),
    StructField("item", IntegerType(), False),
    StructField("rating", FloatType(), False),
])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("train")
    p.add_argument("test")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--reg", type=float, default=0.05)
    p.add_argument("--iters", default="1,2,5,10")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    iters = [int(x) for x in a.iters.split(",") if x]
    spark = (SparkSession.builder.master("local[2]").appName("tidepool-mf-peer")
             .config("spark.driver.memory", "8g")
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.shuffle.partitions", "4")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    spark.sparkContext.setCheckpointDir("/tmp/tidepool-mf-spark-checkpoints")
    raw = spark.read.csv(a.train, header=True, schema=SCHEMA)
    mu = raw.agg(F.avg("rating")).first()[0]
    train = raw.withColumn("rating", (F.col("rating") - F.lit(mu)).cast("float")).cache()
    test = spark.read.csv(a.test, header=True, schema=SCHEMA).cache()
    rows = (train.count(), test.count())
    print(f"spark: {rows[0]} training and {rows[1]} test ratings cached", file=sys.stderr)
    ev = RegressionEvaluator(metricName="rmse", labelCol="rating", predictionCol="prediction")
    # An untimed fit first: the JVM compiles ALS's code paths (Tidepool's bench likewise runs
    # an untimed one-step job before its timed ones).
    ALS(rank=a.rank, maxIter=1, regParam=a.reg, userCol="user", itemCol="item",
        ratingCol="rating", seed=a.seed).fit(train)
    fits = []
    for run in range(a.runs):
        for it in iters:
            als = ALS(rank=a.rank, maxIter=it, regParam=a.reg, userCol="user", itemCol="item",
                      ratingCol="rating", coldStartStrategy="drop", seed=a.seed + run)
            t0 = time.perf_counter()
            model = als.fit(train)
            # fit() materialises the factors (their final count runs inside it); scoring is
            # outside the timed region, as Tidepool's is.
            secs = time.perf_counter() - t0
            pred = model.transform(test).withColumn("prediction",
                                                     F.col("prediction") + F.lit(mu))
            rmse = ev.evaluate(pred)
            fits.append({"run": run, "max_iter": it, "seconds": secs, "test_rmse": rmse})
            print(f"spark local[2] ALS rank {a.rank}, run {run}, maxIter {it}: "
                  f"fit {secs:.2f} s, test RMSE {rmse:.4f}", file=sys.stderr)
            model.userFactors.unpersist()
            model.itemFactors.unpersist()
    spark.stop()
    print(json.dumps({"master": "local[2]", "rank": a.rank, "reg_param": a.reg, "mu": mu,
                      "train_rows": rows[0], "test_rows": rows[1], "fits": fits}))


if __name__ == "__main__":
    main()
