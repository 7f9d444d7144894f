<?php
// Read the whole request body in 64 KiB chunks and answer its length.
$in = fopen('php://input', 'rb');
$total = 0;
while (!feof($in)) {
    $chunk = fread($in, 65536);
    if ($chunk === false) {
        break;
    }
    $total += strlen($chunk);
}
fclose($in);
header('Content-Type: text/plain');
echo $total;
